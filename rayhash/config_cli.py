"""``rayhash config show [NAME]``: the run configs shipped in the package (nothing heavy imported here)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="show the run configs shipped with rayhash",
                              description="Run configs shipped in the package; `--config NAME` of train, demo and "
                                          "pipeline loads them by name.")
    sub = p.add_subparsers(dest="config_command", metavar="<config command>")
    p.set_defaults(func=lambda args: p.print_help() or 2)
    s = sub.add_parser("show", help="print a shipped config (without NAME: list them)")
    s.add_argument("name", nargs="?", help="config name, e.g. demo (or a YAML path)")
    s.set_defaults(func=_show)


def _show(args) -> int:
    from rayhash.config import find_config, shipped_configs

    if not args.name:
        print("\n".join(shipped_configs()))
        return 0
    with open(find_config(args.name), encoding="utf-8") as f:
        print(f.read(), end="")
    return 0
