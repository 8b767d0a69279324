"""The `jeststream` console script: a thin dispatcher over subcommands that live with their layer."""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help). Imported lazily so that `jeststream inspect` does
# not pay for open_clip, and a missing optional extra only breaks the subcommand that needs it.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("jeststream.demo", "main", "JEST vs uniform training on the embedded digits set"),
    "inspect": ("jeststream.selection_log", "inspect_main", "summarise a selection log"),
    "report": (
        "jeststream.report",
        "main",
        "an HTML page of what a selection log kept and rejected, with thumbnails",
    ),
    "precompute-reference": (
        "jeststream.adapters.precompute_reference",
        "main",
        "embed shards with the frozen reference once, into a reference cache",
    ),
    "openclip-train": (
        "jeststream.adapters.open_clip_train",
        "main",
        "open_clip_train with the training loader wrapped in JEST",
    ),
}


def _usage() -> str:
    lines = ["usage: jeststream SUBCOMMAND [ARGS...]", "", "subcommands:"]
    for name, (_, _, doc) in SUBCOMMANDS.items():
        lines.append(f"  {name:<16} {doc}")
    lines.append("")
    lines.append("Run `jeststream SUBCOMMAND --help` for a subcommand's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"jeststream: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"jeststream {name}: cannot import {module_name} ({exc}). "
            "Install the extra it needs, e.g. `pip install 'jeststream[all]'`.",
            file=sys.stderr,
        )
        return 2
    result = getattr(module, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
