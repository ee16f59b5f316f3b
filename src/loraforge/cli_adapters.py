"""`loraforge adapters ACTION` (the store: versions, lineage, rollback, import and export) and `loraforge update`
(a gated continuous update of an adapter). Commands parse, call one service function, and print the answer."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraforge.errors import LoraforgeError


def cmd_adapters_list(args) -> int:
    from loraforge.store import Store

    for row in Store().list():
        print(f"{row['name']:<40} active v{row['active_version']}  ({row['versions']} versions)")
    return 0


def cmd_adapters_show(args) -> int:
    from loraforge.store import Store

    print(json.dumps(Store().get(args.ref).public(), indent=2))
    return 0


def cmd_adapters_delete(args) -> int:
    from loraforge.store import Store

    count = Store().delete(args.name)
    print(f"deleted {args.name} ({count} versions)")
    return 0


def cmd_adapters_import(args) -> int:
    from loraforge.store import Store

    version = Store().import_peft_dir(Path(args.dir), args.name)
    print(f"imported {args.dir} as {version.ref}")
    return 0


def cmd_adapters_export(args) -> int:
    from loraforge.store import Store

    target = Store().export(args.ref, Path(args.dir))
    print(f"exported {args.ref} to {target}")
    return 0


def _server_call(method: str, path: str, server: str) -> dict:
    import httpx

    headers = {}
    if os.environ.get("LORAFORGE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['LORAFORGE_API_KEY']}"
    try:
        response = httpx.request(method, server.rstrip("/") + path, headers=headers, timeout=600)
    except httpx.HTTPError as exc:
        raise LoraforgeError(f"cannot reach the server at {server}: {type(exc).__name__} "
                             "(start it with: loraforge serve)") from None
    body = response.json()
    if response.status_code >= 400:
        raise LoraforgeError(body.get("error", {}).get("message", f"HTTP {response.status_code}"))
    return body


def cmd_adapters_load(args) -> int:
    print(json.dumps(_server_call("POST", f"/api/adapters/{args.ref}/load", args.server)))
    return 0


def cmd_update(args) -> int:
    import uuid

    from loraforge.continuous import UpdateOptions, run_update
    from loraforge.data import load_examples_from_file
    from loraforge.evals.gate import GatePolicy
    from loraforge.evals.suite import load_suite
    from loraforge.store import Store

    new = load_examples_from_file(Path(args.data))
    suite = load_suite(Path(args.suite)) if args.suite else None
    options = UpdateOptions(replay_ratio=args.replay_ratio, seed=args.seed, keep=args.keep, num_epochs=args.epochs,
                            learning_rate=args.learning_rate,
                            policy=GatePolicy(min_efficacy=args.min_efficacy, tolerance=args.tolerance,
                                              min_generalization=args.min_generalization,
                                              guard=("efficacy", "retention")
                                              + (("generalization",) if args.guard_generalization else ())))
    result = run_update(Store(), args.name, new, suite, options, run_id=f"update-{uuid.uuid4().hex[:12]}",
                        device=args.device, log=lambda m: print(m, flush=True))
    verdict = "promoted" if result.promoted else "rejected"
    print(f"{verdict}: {result.version.ref} (exit {result.exit_code})")
    return result.exit_code


def cmd_adapters_history(args) -> int:
    from loraforge.continuous import history
    from loraforge.store import Store

    if args.json:
        print(json.dumps(history(Store(), args.name), indent=2))
        return 0
    hist = history(Store(), args.name)
    print(f"{hist['name']}: active v{hist['active_version']}")
    for row in hist["versions"]:
        added = f"+{row['examples']} new, {row['replayed']} replayed" if row["examples"] is not None else "trained"
        parent = f"from v{row['parent']}" if row["parent"] else "root"
        print(f"v{row['version']:<3} {row['status']:<9} {parent:<8} {added:<26} {row['created_at']}")
        if row["decision"]:
            print(f"     gate: {row['decision']}")
            for suite, scores in row["scores"].items():
                before = row["parent_scores"].get(suite, {})
                shown = ", ".join(f"{k} {_pct(before.get(k))} -> {_pct(v)}" for k, v in scores.items() if v is not None)
                print(f"       {suite}: {shown}")
            for reason in row["reasons"]:
                print(f"       reason: {reason}")
    for entry in hist["log"]:
        if entry["action"] in ("rollback", "promote", "prune"):
            print(f"{entry['at']} {entry['action']} v{entry['version']} {entry['detail']}".rstrip())
    return 0


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def cmd_adapters_rollback(args) -> int:
    from loraforge.store import Store

    to = int(args.to.lstrip("v")) if args.to else None
    version = Store().rollback(args.name, to)
    print(f"{args.name} now serves {version.ref} (a running server switches on its next request)")
    return 0


def cmd_adapters_prune(args) -> int:
    from loraforge.store import Store

    removed = Store().prune(args.name, args.keep)
    print(f"removed {', '.join(f'v{v}' for v in removed) if removed else 'nothing'}")
    return 0


def add_adapters_parser(sub) -> None:
    adapters = sub.add_parser("adapters", help="adapters in the store").add_subparsers(
        dest="adapters_command", required=True, metavar="ACTION")
    p = adapters.add_parser("list", help="every adapter and its active version")
    p.set_defaults(func=cmd_adapters_list)
    p = adapters.add_parser("show", help="one version's record (NAME or NAME@vN)")
    p.add_argument("ref")
    p.set_defaults(func=cmd_adapters_show)
    p = adapters.add_parser("load", help="load an adapter (and its base) into a running server")
    p.add_argument("ref", help="NAME or NAME@vN")
    p.add_argument("--server", default="http://127.0.0.1:5001")
    p.set_defaults(func=cmd_adapters_load)
    p = adapters.add_parser("history", help="lineage, data added, scores and gate decisions per version")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters_history)
    p = adapters.add_parser("rollback", help="serve an earlier version again (default: the active one's parent)")
    p.add_argument("name")
    p.add_argument("--to", help="version to activate, e.g. v2")
    p.set_defaults(func=cmd_adapters_rollback)
    p = adapters.add_parser("prune", help="keep the newest K versions (never the active one or its parent)")
    p.add_argument("name")
    p.add_argument("--keep", type=int, required=True)
    p.set_defaults(func=cmd_adapters_prune)
    p = adapters.add_parser("delete", help="delete an adapter and all its versions")
    p.add_argument("name")
    p.set_defaults(func=cmd_adapters_delete)
    p = adapters.add_parser("import", help="take an existing PEFT adapter folder in as a new version")
    p.add_argument("dir")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_adapters_import)
    p = adapters.add_parser("export", help="write a verified copy of a version to a new folder")
    p.add_argument("ref", help="NAME or NAME@vN")
    p.add_argument("dir")
    p.set_defaults(func=cmd_adapters_export)


def add_update_parser(sub) -> None:
    p = sub.add_parser("update", help="train a candidate from the active version on new data (+ replay), gate it "
                                      "on every suite in its lineage; exit 0 promoted, 3 rejected")
    p.add_argument("name", help="the adapter to update (its active version is the parent)")
    p.add_argument("--data", required=True, help="new training data (JSON array or JSONL)")
    p.add_argument("--suite", help="suite for the new knowledge (YAML/JSON); kept with the version")
    p.add_argument("--replay-ratio", type=float, default=1.0, help="replayed earlier examples per new one "
                                                                   "(default 1.0; 0 = none)")
    p.add_argument("--min-efficacy", type=float, default=0.9, help="new suite's efficacy needed (default 0.9)")
    p.add_argument("--min-generalization", type=float, default=0.0, help="new suite's paraphrase score needed")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed drop on earlier suites (default 0.05)")
    p.add_argument("--guard-generalization", action="store_true",
                   help="also reject when earlier suites' paraphrase scores drop (default: efficacy, retention)")
    p.add_argument("--keep", type=int, help="afterwards keep only the newest K versions")
    p.add_argument("--epochs", type=float, help="epochs for this update (default: the parent's)")
    p.add_argument("--learning-rate", type=float, help="learning rate for this update (default: the parent's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the replay sample")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=cmd_update)
