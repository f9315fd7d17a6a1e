"""Write one expert project per cluster of a partition (SLM-mix), from a template.

    python examples/slm_mix/write_experts.py GENERIC.toml EXPERTS [--template examples/slm_mix/expert.toml]

GENERIC.toml is the project `nichelm select` ran on with select.method = "clusters" and select.partition =
true; its RUN/select/selection.json lists the cluster files. For each cluster with documents this writes
EXPERTS/cluster-NNNN.toml: the template with @CLUSTER_FILE@ (the cluster's file), @RUN_DIR@
(EXPERTS/cluster-NNNN, where `nichelm specialize --pick-expert EXPERTS` looks for it) and @CLUSTER@
(cluster-NNNN) filled in, and prints the project files, one a line, for a loop such as

    for p in $(python examples/slm_mix/write_experts.py generic.toml experts); do
        nichelm prepare "$p" && nichelm train "$p"
    done
"""

import argparse
import json
import sys
from pathlib import Path

from nichelm.config import load_project
from nichelm.errors import UserError

TEMPLATE = Path(__file__).with_name("expert.toml")


def write_experts(project: Path, experts: Path, template: Path = TEMPLATE) -> list[Path]:
    run = load_project(project).run_path
    path = run / "select" / "selection.json"
    try:
        partition = json.loads(path.read_text(encoding="utf-8"))["partition"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{path}: no partition; run `nichelm select {project} --set select.partition=true` "
                        "(select.method = \"clusters\") first") from None
    text = template.read_text(encoding="utf-8")
    experts = experts.resolve()
    experts.mkdir(parents=True, exist_ok=True)
    written = []
    for row in partition["clusters"]:
        if not row["documents"]:
            continue                     # nothing to train on: this cluster has no expert
        name = f"cluster-{row['cluster']:04d}"
        data = Path(partition["folder"]) / row["file"]
        out = experts / f"{name}.toml"
        # json.dumps: a TOML basic string (quotes and backslashes escaped)
        out.write_text(text.replace('"@CLUSTER_FILE@"', json.dumps(str(data)))
                           .replace('"@RUN_DIR@"', json.dumps(str(experts / name)))
                           .replace("@CLUSTER@", name), encoding="utf-8")
        written.append(out)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path, help="the project select partitioned (select.partition = true)")
    ap.add_argument("experts", type=Path, help="the folder of the expert projects and runs")
    ap.add_argument("--template", type=Path, default=TEMPLATE, help="an expert project with the @...@ fields")
    args = ap.parse_args(argv)
    try:
        for path in write_experts(args.project, args.experts, args.template):
            print(path)
    except UserError as e:
        print(f"write_experts: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
