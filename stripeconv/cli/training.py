"""The commands that train: ``train``, ``prune``, ``finetune`` and ``demo``."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from .common import (CLIError, check_device, check_out_dir, engine_kwargs, resume_meta, saved_extra, say, say_result,
                     setup_run, short_kwargs, source_digest, warn_replaced)
from .data import DEFAULT_MODEL, check_fits, parse_model_kwargs, build_model, data_spec, load_datasets
from .methods import (apply_config_defaults, effective_params, find_method, load_config, method_kwargs, method_params,
                      methods_taking)


def cmd_train(args) -> int:
    from ..artifacts import save_pruned
    from ..distributed import cleanup
    from ..engine import Engine, evaluate_model

    ctx = setup_run(args)
    try:
        spec = data_spec(args)
        train, test, meta = load_datasets(spec)
        model, arch, kw = build_model(args.model or DEFAULT_MODEL[spec["dataset"]], meta["num_classes"],
                                      meta["input_size"][1], args.width, parse_model_kwargs(args))
        model.to(ctx.device)
        say(f"train {arch}({short_kwargs(kw)}) on {spec['dataset']}: {meta['train_size']} train / "
            f"{meta['test_size']} test images, {args.epochs} epochs, {ctx.world_size} process(es) on {ctx.device}",
            args, ctx)
        warn_replaced(args, ctx)
        engine = Engine(model, train, epochs=args.epochs, eval_data=test, phase="train",
                        meta=resume_meta(args, spec, model=arch, arch_kwargs=kw), **engine_kwargs(args, ctx))
        engine.run()
        ev = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx)
        if ctx.is_main:
            out = Path(args.out)
            save_pruned(model, out / "model", arch, kw, extra=saved_extra(
                spec, meta, accuracy=ev["accuracy"], phase="train", epochs=args.epochs))
            engine.log.write({"phase": "train", "event": "saved", "path": str(out / "model"),
                              "eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"]})
        say_result(f"test accuracy {ev['accuracy']:.4f}; model saved to {Path(args.out) / 'model'}.pt/.json",
                   ctx)
        ctx.barrier()
    finally:
        cleanup(ctx, barrier=False)  # the success path met at the barrier above
    return 0


def cmd_prune(args) -> int:
    from ..artifacts import load_pruned, read_description, save_pruned
    from ..distributed import cleanup
    from ..engine import Engine, evaluate_model, is_oneshot

    config = load_config(args.config) if args.config else {}
    apply_config_defaults(args, config)
    method = args.method or config.get("method")
    if not method:
        raise CLIError("prune needs --method NAME (or `method:` in --config); see `stripeconv methods`")
    method_name, cls = find_method(method)
    if args.val_split is not None and "val_data" not in method_params(cls):  # the held-out images would be lost
        raise CLIError(f"--val-split: {method_name} measures nothing on held-out data, so it would only train on fewer "
                       f"images; the methods that use held-out data are {', '.join(methods_taking('val_data'))}")
    kwargs = method_kwargs(cls, args, config)
    if args.from_:
        given = [o for o, v in (("--model", args.model), ("--width", args.width), ("--model-kwargs", args.model_kwargs))
                 if v is not None]
        if given:  # they would be ignored: the saved model fixes the architecture
            raise CLIError(f"{', '.join(given)} cannot be combined with --from (the saved model is the architecture)")
    ctx = setup_run(args)
    try:
        if args.from_:
            desc = read_description(args.from_)
            spec = data_spec(args, desc.get("extra", {}).get("data"))
            train, test, meta = load_datasets(spec)
            check_fits(desc, meta, args.from_, spec)
            model = load_pruned(args.from_, map_location=ctx.device)
            arch, kw = desc["arch"], desc["arch_kwargs"]
            source = str(args.from_)
        else:
            spec = data_spec(args)
            train, test, meta = load_datasets(spec)
            model, arch, kw = build_model(args.model or DEFAULT_MODEL[spec["dataset"]], meta["num_classes"],
                                          meta["input_size"][1], args.width, parse_model_kwargs(args))
            source = f"{arch} from scratch"
        model.to(ctx.device).train()
        train, runtime = _runtime_kwargs(cls, kwargs, train, args, ctx)
        before = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx) if args.from_ \
            else None
        try:
            pruner = cls(model, input_size=tuple(meta["input_size"]), **kwargs, **runtime)
        except (TypeError, ValueError, KeyError) as e:
            # pruners name themselves in their messages; str() of a KeyError would quote its message
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise CLIError(msg if msg.startswith(method_name) else f"{method_name}: {msg}") from e
        oneshot = is_oneshot(pruner)
        if args.train_full_size and not oneshot:  # else silently ignored
            raise CLIError(f"--train-full-size applies to one-shot methods only; {method_name} prunes while it trains, "
                           "on the full-size model")
        prune_data = None
        if oneshot:
            from torch.utils.data import DataLoader

            prune_data = DataLoader(train, batch_size=args.batch_size, shuffle=False)
        # after a one-shot method the epochs train the exported network: it computes what the masked
        # model computes, without the dead channels and pruned stripes that the full-size one carries
        retrain = oneshot and args.epochs > 0 and not args.train_full_size
        say(f"prune {source} with {method_name}({short_kwargs(kwargs)}) on {spec['dataset']}: "
            f"{'one-shot + ' if oneshot else ''}{args.epochs} epochs"
            f"{' of the exported network' if retrain else ''}, {ctx.world_size} process(es) on {ctx.device}",
            args, ctx)
        run_meta = resume_meta(args, spec, method=method_name, params=effective_params(cls, kwargs), model=arch,
                               arch_kwargs=kw, source=source_digest(args.from_) if args.from_ else None,
                               val_split=args.val_split)
        warn_replaced(args, ctx)
        engine = Engine(model, train, pruner=pruner, epochs=0 if retrain else args.epochs, eval_data=test,
                        phase="prune", prune_data=prune_data, meta=run_meta, **engine_kwargs(args, ctx))
        engine.run()
        history, files = list(engine.history), ["prune.ckpt"]
        exported = None
        if retrain:  # every rank: the masks are the same everywhere after the one-shot step
            exported = pruner.export().to(ctx.device).train()
            retrain_engine = Engine(exported, train, epochs=args.epochs, eval_data=test, phase="retrain",
                                    meta=run_meta, **engine_kwargs(args, ctx))
            retrain_engine.run()
            history += retrain_engine.history
            files.append("retrain.ckpt")
        result = {}
        if ctx.is_main:
            exported = (exported if exported is not None else pruner.export()).eval()
            after = evaluate_model(exported, test, ctx.device, batch_size=args.eval_batch_size)
            rep = pruner.report(exported)
            out = Path(args.out)
            save_pruned(exported.cpu(), out / "pruned", arch, kw, extra=saved_extra(
                spec, meta, accuracy=after["accuracy"], accuracy_before=before["accuracy"] if before else None,
                phase="prune", method=method_name, params=_jsonable_params(kwargs), source=source,
                flops_reduction=rep["flops_reduction"], params_reduction=rep["params_reduction"]))
            result = {"phase": "export", "event": "saved", "path": str(out / "pruned"), "method": method_name,
                      "eval_accuracy": after["accuracy"], "eval_loss": after["loss"],
                      "accuracy_before": before["accuracy"] if before else None,
                      **{k: rep[k] for k in ("flops_dense", "flops", "flops_reduction", "params_dense", "params",
                                             "params_reduction", "stripe_density", "gpu_tile_efficiency")}}
            engine.log.truncate("export", 0)  # one export record per output folder, also after --resume
            engine.log.write(result)
            (out / "prune_report.json").write_text(json.dumps(result, indent=1))
            from ..report import write_report
            write_report(out, {"title": f"{method_name} on {spec['dataset']}", "prune_report": rep,
                               "accuracy_before": before["accuracy"] if before else None,
                               "accuracy_after": after["accuracy"], "history": history,
                               "files": ["pruned.pt", "pruned.json", "metrics.jsonl", *files]}, plot=False)
            b = f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}" if before \
                else f"accuracy {after['accuracy']:.4f}"
            say_result(f"{method_name}: {b}, FLOPs -{rep['flops_reduction']:.1%}, "
                       f"params -{rep['params_reduction']:.1%}; saved {out / 'pruned'}.pt/.json "
                       "(load with stripeconv.artifacts.load_pruned)", ctx)
        ctx.barrier()
    finally:
        cleanup(ctx, barrier=False)  # the success path met at the barrier above
    return 0


def _runtime_kwargs(cls, kwargs: dict, train, args, ctx):
    """Arguments the CLI supplies itself: ``val_data`` (a held-out split of the training data, for LBS, DAIS and
    DSA: ``--val-split``), ``search_steps`` (DAIS, DSA: half of the training steps unless set) and ``verbose``
    (progress, unless ``--quiet``).
    Returns the (possibly reduced) training set and those arguments; other missing required ones are errors."""
    import math

    from torch.utils.data import DataLoader

    from ..pruning import holdout_split

    params = method_params(cls)
    runtime: dict[str, Any] = {}
    if "val_data" in params:
        split = args.val_split or 0.1
        try:
            train, held = holdout_split(train, split if split < 1 else int(split), seed=args.seed)
        except ValueError as e:
            raise CLIError(f"--val-split {split}: {e}") from e
        if "val_data" in params:
            runtime["val_data"] = DataLoader(held, batch_size=args.batch_size, shuffle=False)
        say(f"held out {len(held)} training images for {cls.__name__}'s loss measurements (--val-split {split})",
            args, ctx)
    if "search_steps" in params and kwargs.get("search_steps") is None \
            and params["search_steps"].default is inspect.Parameter.empty:
        steps = math.ceil(len(train) / (args.batch_size * ctx.world_size))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        kwargs["search_steps"] = max(1, max(1, args.epochs // 2) * steps)
        say(f"search_steps={kwargs['search_steps']} (half of the epochs; --set search_steps=N to change)", args, ctx)
    if "verbose" in params and "verbose" not in kwargs:  # progress of the one-shot scoring and searches
        runtime["verbose"] = not args.quiet and ctx.is_main
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs
               and k not in runtime]
    needs = []
    if "target_flops_reduction" in missing:  # set with --target, which is what to say
        missing.remove("target_flops_reduction")
        given = [f"--target {k}={v}" for k, v in (("ratio", "R"), ("ratios", "...")) if kwargs.get(k) is not None]
        needs.append("--target flops=F (the fraction of the FLOPs to remove)" + (f", not {given[0]}" if given else ""))
    if missing:
        needs.append(f"{', '.join(missing)} (with --set KEY=VALUE or --config)")
    if needs:
        raise CLIError(f"{cls.__name__} needs {'; and '.join(needs)}")
    return train, runtime


def _jsonable_params(kw: dict) -> dict:
    return json.loads(json.dumps(kw, default=repr))


def cmd_finetune(args) -> int:
    from ..artifacts import load_pruned, read_description, save_pruned
    from ..distributed import cleanup
    from ..engine import Engine, evaluate_model

    ctx = setup_run(args)
    try:
        desc = read_description(args.model_path)
        extra = desc.get("extra", {})
        spec = data_spec(args, extra.get("data"))
        train, test, meta = load_datasets(spec)
        check_fits(desc, meta, args.model_path, spec)
        model = load_pruned(args.model_path, map_location=ctx.device).train()
        before = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx)
        say(f"finetune {args.model_path} on {spec['dataset']}: {args.epochs} epochs, {ctx.world_size} process(es) "
            f"on {ctx.device}; accuracy before {before['accuracy']:.4f}", args, ctx)
        warn_replaced(args, ctx)
        engine = Engine(model, train, epochs=args.epochs, eval_data=test, phase="finetune",
                        meta=resume_meta(args, spec, arch=desc["arch"], source=source_digest(args.model_path)),
                        **engine_kwargs(args, ctx))
        engine.run()
        after = evaluate_model(model, test, ctx.device, batch_size=args.eval_batch_size, ctx=ctx)
        if ctx.is_main:
            out = Path(args.out)
            new_extra = {**extra, **saved_extra(spec, meta), "accuracy": after["accuracy"],
                         "accuracy_before_finetune": before["accuracy"], "phase": "finetune",
                         "finetune_epochs": args.epochs, "source": str(args.model_path)}
            save_pruned(model.cpu(), out / "finetuned", desc["arch"], desc["arch_kwargs"], extra=new_extra)
            engine.log.write({"phase": "finetune", "event": "saved", "path": str(out / "finetuned"),
                              "eval_accuracy": after["accuracy"], "accuracy_before": before["accuracy"]})
        say_result(f"finetune: accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}; saved "
                   f"{Path(args.out) / 'finetuned'}.pt/.json", ctx)
        ctx.barrier()
    finally:
        cleanup(ctx, barrier=False)  # the success path met at the barrier above
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    check_device(args.device)
    check_out_dir(args.out)
    run_demo(out=args.out, data=args.data, train_size=args.train_size, test_size=args.test_size,
             epochs=args.epochs, prune_epochs=args.prune_epochs, target=args.target, seed=args.seed,
             bench_batch=args.bench_batch, bench_threads=args.bench_threads or None, quiet=args.quiet,
             progress=not args.no_progress, resume=args.resume,
             threads=args.threads, device=args.device, quick=args.quick)
    return 0
