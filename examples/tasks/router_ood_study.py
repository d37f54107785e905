"""Router variants on both test splits of the demo suite: what docs/RESULTS.md's out-of-template table reports.

    python -m examples.tasks.router_ood_study [--artifact artifacts/demo] [--augment 2] [--arrow]
        [--encoder DIR] [--out benchmarks/results/router_ood.json] [--cache FEATURES.pt] [--combine OTHER.pt]

Routing data as the demo trains its router: the first 200 train lines per task, 20% held out per expert
(seed 0) for calibration. Every variant is scored on `test` (in-distribution), `val_ood` and `test_ood` (the
two out-of-template splits, each with its own templates): top-1, ECE and per-task accuracy. The anchor weight
of "+ anchors" is chosen on val_ood (best top-1, then lowest ECE) from ANCHOR_WEIGHTS; test_ood is only scored.
Features of the sentence encoder (MiniLM, or any sentence-transformers directory `--encoder` names) are
computed once; `--arrow` also runs the training-free Arrow router over the artifact's core
and factors (a core forward pass per prompt: minutes on a CPU). `--combine` reads another encoder's `--cache`
file and adds rows that sum the calibrated log-probabilities of one head over each encoder (every pair of
trained/prototype heads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from router.augment import augment
from router.data import read_examples, stratified_split
from router.encoders import CoreEncoder, SentenceEncoder
from router.heads import fit_prototypes, fit_temperature, train_mlp
from router.inputs import routing_text
from router.metrics import evaluate
from twinrt.models import minilm_dir

SUITE = Path(__file__).parent
PER_TASK = 200
SPLITS = ("test", "val_ood", "test_ood")
ANCHOR_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5)


def load(experts: list[str], split: str, limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    ex = [x for e in experts for x in read_examples(SUITE / e / f"{split}.jsonl", "task")[:limit]]
    return [routing_text(x.input) for x in ex], torch.tensor([experts.index(x.label) for x in ex])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--augment", type=int, default=2, help="recombined copies per training prompt (0 = skip)")
    p.add_argument("--arrow", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--encoder", type=Path, default=None,
                   help="sentence-transformers model directory (safetensors weights; default: the bundled MiniLM)")
    p.add_argument("--cache", type=Path, default=None, help="encoder features: read if it exists, else written")
    p.add_argument("--combine", type=Path, default=None,
                   help="another encoder's --cache file: also score each head of this encoder summed with each of that")
    args = p.parse_args()
    experts = json.loads((args.artifact / "twin.json").read_text())["experts"]
    experts = [e["name"] for e in experts]
    enc = SentenceEncoder(args.encoder or minilm_dir())
    feats = torch.load(args.cache, weights_only=True) if args.cache and args.cache.is_file() else {}
    if not feats:
        desc = {t["name"]: t["description"] for t in json.loads((SUITE / "suite.json").read_text())["tasks"]}
        for split, limit in (("train", PER_TASK), *((s, None) for s in SPLITS)):
            t, lab = load(experts, split, limit)
            feats[split] = (t, enc.encode(t), lab)
        feats["anchors"] = enc.encode([desc[e] for e in experts])
    texts, x, y = feats["train"]
    data = {s: feats[s] for s in SPLITS}
    anchors = F.normalize(feats["anchors"], dim=-1)
    tr, ho = (torch.tensor(ix) for ix in stratified_split(y.tolist(), experts, 0.2, 0))
    rows: dict[str, dict] = {}

    def report(name: str, logits_of) -> None:
        rows[name] = {}
        for s in SPLITS:
            ev = evaluate(logits_of(s), data[s][2])
            rows[name][s] = {"accuracy": ev.accuracy, "ece": ev.ece, "per_task": dict(zip(experts, ev.per_expert))}
        print(f"{name:<42} " + "  ".join(f"{s} {rows[name][s]['accuracy']:.1%} ECE {rows[name][s]['ece']:.3f}"
                                        for s in SPLITS), flush=True)

    def calibrated_on(head, feats_train):
        t = fit_temperature(head(feats_train[ho]).detach(), y[ho])
        return lambda feats: head(feats).detach() / t

    def calibrated(head):
        return calibrated_on(head, x)

    zero_shot = lambda f: 20 * F.normalize(f, dim=-1) @ anchors.T                # noqa: E731
    lin = calibrated(train_mlp(x[tr], y[tr], len(experts), hidden=0)[0])
    proto = calibrated(fit_prototypes(x[tr], y[tr], len(experts)))
    report("trained", lambda s: lin(data[s][1]))
    report("prototype", lambda s: proto(data[s][1]))
    report("anchors (zero-shot, descriptions)", lambda s: zero_shot(data[s][1]))
    for name, head in (("trained", lin), ("prototype", proto)):
        def anchored(s, a, head=head):
            return F.log_softmax(head(data[s][1]), -1) + a * F.log_softmax(zero_shot(data[s][1]), -1)

        val = {a: evaluate(anchored("val_ood", a), data["val_ood"][2]) for a in ANCHOR_WEIGHTS}
        best = min(ANCHOR_WEIGHTS, key=lambda a: (-val[a].accuracy, val[a].ece))
        print(f"{name} + anchors on val_ood: " + ", ".join(f"{a}: {v.accuracy:.1%}" for a, v in val.items()))
        report(f"{name} + anchors (weight {best}, chosen on val_ood)", lambda s, a=best: anchored(s, a))
    # val_ood's prompts as more routing data (relabelled production traffic in other phrasings): its own scores
    # are then training scores; test_ood is still unseen
    xv, yv = data["val_ood"][1], data["val_ood"][2]
    lin_v = calibrated(train_mlp(torch.cat([x[tr], xv]), torch.cat([y[tr], yv]), len(experts), hidden=0)[0])
    proto_v = calibrated(fit_prototypes(torch.cat([x[tr], xv]), torch.cat([y[tr], yv]), len(experts)))
    report("trained + val_ood as routing data", lambda s: lin_v(data[s][1]))
    report("prototype + val_ood as routing data", lambda s: proto_v(data[s][1]))
    if args.augment:
        names = [experts[int(i)] for i in y[tr]]
        if "augment" not in feats:
            aug = augment([texts[i] for i in tr.tolist()], names, copies=args.augment, seed=0)
            feats["augment"] = (aug, enc.encode([t for t, _ in aug]), torch.tensor([experts.index(n) for _, n in aug]))
        xa, ya = torch.cat([x[tr], feats["augment"][1]]), torch.cat([y[tr], feats["augment"][2]])
        lin_a = calibrated(train_mlp(xa, ya, len(experts), hidden=0)[0])
        proto_a = calibrated(fit_prototypes(xa, ya, len(experts)))
        report(f"trained + recombination x{args.augment}", lambda s: lin_a(data[s][1]))
        report(f"prototype + recombination x{args.augment}", lambda s: proto_a(data[s][1]))
    if args.combine:
        other = torch.load(args.combine, weights_only=True)  # tensors and strings only: no code
        if [len(other[s][0]) for s in SPLITS] != [len(data[s][0]) for s in SPLITS]:
            raise SystemExit(f"{args.combine} holds other prompts than this run's (another suite or artifact)")
        xo = other["train"][1]
        heads = {"trained": lin, "prototype": proto}
        others = {"trained": calibrated_on(train_mlp(xo[tr], y[tr], len(experts), hidden=0)[0], xo),
                  "prototype": calibrated_on(fit_prototypes(xo[tr], y[tr], len(experts)), xo)}
        for a, ha in heads.items():
            for b, hb in others.items():
                report(f"{a} + other encoder's {b}", lambda s, ha=ha, hb=hb: F.log_softmax(ha(data[s][1]), -1)
                       + F.log_softmax(hb(other[s][1]), -1))
    if args.cache and not args.cache.is_file():
        torch.save(feats, args.cache)
    if args.arrow:
        from router.arrow import ArrowEncoder, prototypes, read_factors

        core = CoreEncoder.from_dir(args.artifact / "core")
        factors = [read_factors(str(args.artifact / "experts" / e / "adapter_model.safetensors")) for e in experts]
        arrow = ArrowEncoder(core.model, core.tokenizer, prototypes(factors))
        z = {s: arrow.encode(data[s][0]) for s in SPLITS}
        report("arrow (training-free, factors)", lambda s: z[s])
    if args.out:
        args.out.write_text(json.dumps({"experts": experts, "routers": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
