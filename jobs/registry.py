r"""Browse and change the model registry from a terminal: what is in production, how versions compare.

    python jobs/registry.py list                          # models, latest version, aliases, champion's errors
    python jobs/registry.py show alexnet                  # every version: errors, aliases, dataset, date, run
    python jobs/registry.py diff alexnet 3 5              # config and metrics side by side, differences marked *
    python jobs/registry.py diff alexnet @champion @challenger
    python jobs/registry.py promote alexnet 5             # 5 becomes @champion (or --alias NAME)
    python jobs/registry.py rollback alexnet              # @champion back to the previous champion
    python jobs/registry.py unlock alexnet                # clear a promotion lock a dead job left behind
    python jobs/registry.py show alexnet --json           # any command: JSON for scripts

The server is MLFLOW_TRACKING_URI (or --tracking-uri), else ./mlflow.db. Exit status 2 with a
message for an unknown model, version or alias, or a server that does not answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `pipeline` imports without an install

from pipeline import cli
from pipeline.errors import InputError
from pipeline.redaction import redact, scrubbed_output

if TYPE_CHECKING:
    from pipeline.tracking.registry import Registry, Version

CHAMPION = "champion"  # pipeline.tracking.registry.CHAMPION, without importing MLflow before the flags are read

PROVENANCE = ("dataset_hash", "dataset_root", "num_classes", "profile", "git_commit", "ray_version",
              "torch_version", "mlflow_version")  # fmt: skip
METRICS = ("val_top1_error", "val_top5_error", "best_epoch", "epochs")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _err(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def cmd_list(registry: Registry, args) -> tuple[Any, str]:
    rows, data = [], []
    for name in registry.model_names():
        versions = registry.versions(name)
        champion = next((v for v in versions if CHAMPION in v.aliases), None)
        aliases = registry.aliases(name)
        entry = {
            "name": name,
            "versions": len(versions),
            "latest": versions[0].version if versions else None,
            "aliases": aliases,
            "champion": champion.as_dict() if champion else None,
        }
        data.append(entry)
        rows.append([
            name, len(versions), entry["latest"], " ".join(f"@{a}=v{v}" for a, v in sorted(aliases.items())) or None,
            champion and f"v{champion.version}", _err(champion and champion.metric("val_top1_error")),
            _err(champion and champion.metric("val_top5_error")),
        ])  # fmt: skip
    if not rows:
        return data, f"no registered models at {redact(registry.uri)}"
    headers = ["model", "versions", "latest", "aliases", "champion", "top-1 err", "top-5 err"]
    return data, table(headers, rows)


def cmd_show(registry: Registry, args) -> tuple[Any, str]:
    versions = registry.versions(args.name)
    model = registry.client.get_registered_model(args.name)
    data = {
        "name": args.name,
        "description": model.description,
        "aliases": registry.aliases(args.name),
        "champion_history": registry.history(args.name),
        "versions": [v.as_dict() for v in versions],
    }
    rows = [
        [
            f"v{v.version}", " ".join(f"@{a}" for a in v.aliases) or None, _err(v.metric("val_top1_error")),
            _err(v.metric("val_top5_error")), v.tags.get("epochs"), _dataset(v), v.as_dict()["created"].replace("T", " "),
            v.run_id,
        ]
        for v in versions
    ]  # fmt: skip
    headers = ["version", "aliases", "top-1 err", "top-5 err", "epochs", "dataset", "created", "run"]
    text = f"{args.name}: {len(versions)} version(s)\n\n" + table(headers, rows)
    return data, text


def cmd_diff(registry: Registry, args) -> tuple[Any, str]:
    a, b = registry.resolve(args.name, args.a), registry.resolve(args.name, args.b)
    rows = []
    for section, keys, read in (
        ("metric", METRICS, lambda v, k: v.tags.get(k)),
        ("config", None, lambda v, k: _params(registry, v).get(k)),
        ("provenance", PROVENANCE, lambda v, k: v.tags.get(k)),
    ):
        if keys is None:
            keys = sorted(set(_params(registry, a)) | set(_params(registry, b)))
        for key in keys:
            left, right = read(a, key), read(b, key)
            rows.append({"section": section, "key": key, "a": left, "b": right, "differs": left != right})
    data = {"name": args.name, "a": a.as_dict(), "b": b.as_dict(), "rows": rows}
    shown = [
        ["*" if r["differs"] else "", r["section"], r["key"], r["a"], r["b"]]
        for r in rows
        if r["differs"] or not args.only_differences
    ]
    changed = sum(r["differs"] for r in rows)
    text = table(["", "section", "key", f"v{a.version}", f"v{b.version}"], shown)
    return data, f"{args.name} v{a.version} vs v{b.version}: {changed} difference(s), marked *\n\n{text}"


def cmd_promote(registry: Registry, args) -> tuple[Any, str]:
    version = registry.promote(
        args.name, args.version.removeprefix("v"), args.alias, lock_timeout=args.wait, force=args.force
    )
    return version.as_dict(), f"{args.name} v{version.version} is now @{args.alias}"


def cmd_rollback(registry: Registry, args) -> tuple[Any, str]:
    old, new = registry.rollback(args.name, lock_timeout=args.wait)
    return {"name": args.name, "from": old, "to": new}, f"{args.name}: @{CHAMPION} v{old} -> v{new}"


def cmd_unlock(registry: Registry, args) -> tuple[Any, str]:
    held = registry.unlock(args.name)
    text = f"{args.name}: promotion lock cleared (it held {held!r})" if held else f"{args.name}: no promotion lock"
    return {"name": args.name, "cleared": held}, text


def _dataset(v: Version) -> str | None:
    digest = v.tags.get("dataset_hash")
    return digest and f"{v.tags.get('dataset_root', '?')} ({digest[:8]})"


_PARAMS: dict[str, dict[str, str]] = {}


def _params(registry: Registry, v: Version) -> dict[str, str]:
    if v.run_id not in _PARAMS:
        _PARAMS[v.run_id] = dict(registry.client.get_run(v.run_id).data.params) if v.run_id else {}
    return _PARAMS[v.run_id]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    cli.add_tracking(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    commands.add_parser("list", help="registered models, latest version, aliases, champion's errors")
    show = commands.add_parser("show", help="every version of a model")
    show.add_argument("name")
    diff = commands.add_parser("diff", help="two versions side by side (VERSION: 3, v3 or @alias)")
    diff.add_argument("name")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--only-differences", action="store_true", help="hide the rows that are equal")
    promote = commands.add_parser("promote", help="point an alias (default @champion) at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", default=CHAMPION, help="the alias to point at the version")
    promote.add_argument("--force", action="store_true", help="make a version no better than chance the champion")
    rollback = commands.add_parser("rollback", help="@champion back to the previous champion")
    rollback.add_argument("name")
    for sub in (promote, rollback):
        sub.add_argument("--wait", type=float, default=600.0, metavar="SECONDS",
                         help="longest wait for the model's promotion lock")  # fmt: skip
    unlock = commands.add_parser("unlock", help="clear the promotion lock a job that died while promoting left")
    unlock.add_argument("name")
    for sub in commands.choices.values():  # --json and --tracking-uri after the command work too
        sub.formatter_class = cli.HelpFormatter
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        sub.add_argument("--tracking-uri", metavar="URI", default=argparse.SUPPRESS, help="MLflow server")
    return parser


def main(argv: list[str] | None = None) -> int:
    scrubbed_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.tracking import mlflow_client
    from pipeline.tracking.registry import Registry

    handlers = {"list": cmd_list, "show": cmd_show, "diff": cmd_diff, "promote": cmd_promote,
                "rollback": cmd_rollback, "unlock": cmd_unlock}  # fmt: skip
    try:
        uri = mlflow_client.resolve_tracking_uri(args.tracking_uri)
        mlflow_client.check_server(uri)
        data, text = handlers[args.command](Registry(uri), args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
