// Uppy's core and its tus plugin as one script for a plain <script> tag: the
// npm packages ship ES modules only, so tools/test.sh bundles them with esbuild.
import Uppy from "@uppy/core";
import Tus from "@uppy/tus";

window.Uppy = { Uppy, Tus };
