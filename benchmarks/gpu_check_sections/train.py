"""7. train: `loraplex train --method qlora` and `--method dora` for a few dozen steps, then the adapter served."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gpu_check_sections.context import Context
from gpu_check_sections.models import agreement, build_model, generate, load_peft, make_engine, release


def section_train(ctx: Context) -> dict:
    from importlib import resources

    from loraplex.server.train import cli as train_cli
    from loraplex.server.train.greedy import greedy_decode

    # `loraplex train`'s own parser and runner, without the rest of the CLI (its gRPC client needs
    # grpcio/protobuf versions a bare GPU image may lack)
    parser = argparse.ArgumentParser(prog="loraplex")
    train_cli.add_parser(parser.add_subparsers(dest="command"))

    s = ctx.sizes
    model_dir = build_model(ctx, s.hidden, s.layers, s.intermediate)
    data = Path(str(resources.files("loraplex.server.data").joinpath("pirate.jsonl")))
    result: dict = {"ok": True}
    for method, quantization in (("qlora", "nf4"), ("dora", "none")):
        out = ctx.work / f"trained-{method}"
        args = ["train", "--model", str(model_dir), "--method", method, "--data", str(data), "--out", str(out),
                "--max-steps", str(s.train_steps), "--batch-size", "4", "--lr", "5e-3", "--device",
                "cuda" if ctx.cuda else "cpu", "--overwrite", "--quiet"]
        started = time.perf_counter()
        code = train_cli.run(parser.parse_args(args))
        summary = json.loads((out / "training_summary.json").read_text())
        engine = make_engine(ctx, model_dir, quantization, slots=2)
        engine.register_adapter(method, str(out))
        prompt = engine.tokenizer.encode("Q: Where do fish live?\nA:")
        served = generate(engine, {"q": (prompt, method)}, s.new_tokens)["q"][0]
        release(engine)
        model = load_peft(ctx, model_dir, out, quantization)
        peft_tokens, _ = greedy_decode(model, prompt, s.new_tokens, None)
        del model
        rate, first = agreement(served, peft_tokens)
        falls = summary["train_loss_last"] < summary["train_loss_first"]
        result[method] = dict(exit_code=code, steps=summary["steps"], loss_first=summary["train_loss_first"],
                              loss_last=summary["train_loss_last"], loss_falls=falls, train_s=summary["seconds"],
                              served_tokens=len(served), token_agreement_vs_peft=rate, first_diff_vs_peft=first,
                              seconds=time.perf_counter() - started)
        result["ok"] = result["ok"] and code == 0 and falls and len(served) == s.new_tokens
    return result
