// The tus project's own Node server (@tus/server + @tus/file-store), as its
// README sets it up, for benchmarks/bench_tus.py.
//
//   node server.mjs <directory> <path>
//
// Listens on 127.0.0.1 on a port the system picks and prints
// "listening <port>" on stdout once it accepts connections. SIGTERM closes it.

import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const [directory, path = "/files"] = process.argv.slice(2);
if (!directory) {
  console.error("usage: node server.mjs <directory> [path]");
  process.exit(2);
}

const tus = new Server({ path, datastore: new FileStore({ directory }) });
const http = tus.listen({ host: "127.0.0.1", port: 0 }, () => {
  console.log(`listening ${http.address().port}`);
});
process.on("SIGTERM", () => http.close(() => process.exit(0)));
