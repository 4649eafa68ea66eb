"""Prints uploadkit/_magic_gates.py for the installed filetype.

Usage: python tools/magic_gates.py > uploadkit/_magic_gates.py
"""

from uploadkit.sniffing import render_gates_module

print(render_gates_module(), end="")
