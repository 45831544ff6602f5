"""Several seeds of one (method, head) configuration trained as one batched model.

:func:`fit_batched` takes one :class:`~train.trainer.Trainer` per seed (same
features, protocol, method and options; different seeds) and trains them
together: at every step each seed draws its own batch exactly as its own run
would (its own shuffling generator and exemplar order), the models' parameters
are stacked (``torch.func.stack_module_state``) and one ``vmap`` of the model
computes every seed's outputs; each seed's method computes its loss terms on
its own slice, and the sum of the seeds' losses is minimised by one optimiser
over the stacked parameters. The seeds' gradients do not mix (each loss depends
on its own slice only) and Adam/AdamW/SGD act elementwise, so every seed
follows the same updates as a separate run; initialisation, task seeds,
exemplar selection, teacher outputs and evaluation are the per-seed Trainer's
own code. The results are those of separate runs up to float rounding: a
batched matrix product may round differently from the unbatched one.

Sound only where a seed's step depends on that seed alone (:func:`why_not_batched`
says why a configuration is not): no dropout (masks would be drawn from one
generator for all seeds), no gradient clipping (a norm over each seed's
gradients), no gradient-editing hooks (``after_backward``), last-epoch model
selection, and a resident FeatureSet. Other configurations run separately.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings

import numpy as np
import torch
from torch.func import functional_call, stack_module_state

from train.methods.base import Method
from train.trainer import RunResult, Trainer, write_acc_matrix, task_seed
from avcl_core import metrics as M


def why_not_batched(trainers: list[Trainer]) -> str | None:
    """None when the trainers can train as one batched model, else the reason they cannot."""
    if len(trainers) < 2:
        return "fewer than two seeds"
    first = trainers[0]
    hp = first.hp
    if any(tr.hp != hp or type(tr.method) is not type(first.method) or tr.head_name != first.head_name
           or tr.head_config != first.head_config or tr.protocol.tasks != first.protocol.tasks for tr in trainers):
        return "the runs differ in more than their seed"
    if type(first.method).after_backward is not Method.after_backward:
        return f"method {first.method.name!r} edits gradients (after_backward)"
    if getattr(hp, "grad_clip", 0) > 0:
        return "gradient clipping is per model"
    cfg = first.head_config
    dropout = cfg.get("dropout") if isinstance(cfg, dict) else getattr(cfg, "dropout", None)
    if dropout is None:
        from train.heads.base import head_config

        dropout = getattr(head_config(first.head_name, cfg if isinstance(cfg, dict) else None), "dropout", 0.0)
    if dropout and dropout > 0:
        return f"head dropout {dropout} > 0 (random masks per run)"
    if first.select != "last":
        return "model selection on validation data is per model"
    if first.fs.streamed:
        return "streamed features"
    return None


def _write_back(models, params, buffers) -> None:
    with torch.no_grad():
        for k, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][k])
            for name, b in model.named_buffers():
                b.copy_(buffers[name][k])


def fit_batched(trainers: list[Trainer]) -> list[RunResult]:
    """Train every trainer's run (one seed each) as one batched model; results per trainer, in order.

    Raises ``ValueError`` with :func:`why_not_batched`'s reason when the
    configuration is not batchable. Run directories get ``log.jsonl``,
    ``acc_matrix.csv`` and ``metrics.json`` as from :meth:`Trainer.fit`
    (no task checkpoints: a batched sweep is restarted, not resumed).
    """
    reason = why_not_batched(trainers)
    if reason:
        raise ValueError(f"seeds cannot train as one batched model: {reason}")
    S, T = len(trainers), trainers[0].T
    hp = trainers[0].hp
    A = [np.full((T, T), np.nan) for _ in trainers]
    step_acc: list[list[float]] = [[] for _ in trainers]
    logs: list[list[dict]] = [[] for _ in trainers]
    t_run = time.perf_counter()
    for t in range(T):
        gens, pools, exs = [], [], []
        for tr in trainers:
            tr.task = t
            seed = task_seed(tr.seed, t)
            torch.manual_seed(seed)
            gens.append(torch.Generator().manual_seed(seed))
            if t == 0 or tr.method.reinit_each_task or tr.model is None:
                tr.old_model = None
                tr.model = tr._build_model(tr.n_seen)
            else:
                tr.old_model = copy.deepcopy(tr.model).eval()
                for p in tr.old_model.parameters():
                    p.requires_grad_(False)
                tr.model.classifier.grow(tr.n_seen - tr.n_old)
            pool, ex = tr._pools(t)
            tr._teacher = tr._teacher_pos = None
            if tr.method.uses_teacher and tr.old_model is not None:
                tr._precompute_teacher(np.unique(np.concatenate([pool, ex])))
            tr.method.before_task(t)
            pools.append(torch.as_tensor(pool, dtype=torch.long, device=tr.device))
            exs.append(torch.as_tensor(ex, dtype=torch.long, device=tr.device))
        models = [tr.model for tr in trainers]
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def f(p, b, x):
            return functional_call(base, (p, b), (x,))

        batched = torch.func.vmap(f)
        opt, sched = trainers[0]._optimizer(list(params.values()))
        n, n_ex = pools[0].numel(), exs[0].numel()
        bs, ebs = hp.batch_size, min(hp.exemplar_batch_size, max(n_ex, 1))
        ex_order: list = [None] * S
        ex_pos = [0] * S
        fs, streams = trainers[0].fs, trainers[0]._head_streams
        for epoch in range(hp.epochs):
            e0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            orders = [fs.epoch_order(pools[k], gens[k]) for k in range(S)]
            sums: list[dict] = [{} for _ in range(S)]
            counts: list[dict] = [{} for _ in range(S)]
            # drop_last as a separate run does it: skip the final partial batch unless it is the only one
            stop = n - n % bs if hp.drop_last and n > bs else n
            for s in range(0, stop, bs):
                idxs = []
                for k in range(S):
                    idx = orders[k][s: s + bs]
                    if n_ex:
                        if ex_order[k] is None or ex_pos[k] + ebs > n_ex:
                            ex_order[k] = exs[k][torch.randperm(n_ex, generator=gens[k]).to(exs[k].device)]
                            ex_pos[k] = 0
                        idx = torch.cat([idx, ex_order[k][ex_pos[k]: ex_pos[k] + ebs]])
                        ex_pos[k] += ebs
                    idxs.append(idx)
                xs = [fs.batch(i, streams) for i in idxs]
                x = {name: torch.stack([xk[name] for xk in xs]) for name in streams}
                with warnings.catch_warnings():
                    # attention has no batching rule on CPU yet: vmap loops over the seeds for that op only
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    out = batched(params, buffers, x)
                total = 0.0
                for k, tr in enumerate(trainers):
                    batch = {"idx": idxs[k], "x": xs[k], "y": tr.y[idxs[k]]}
                    terms = tr.method.loss(batch, {name: v[k] for name, v in out.items()})
                    loss = sum(terms.values())
                    total = total + loss
                    for key, v in (*terms.items(), ("loss", loss)):
                        sums[k][key] = sums[k].get(key, 0.0) + v.detach()
                        counts[k][key] = counts[k].get(key, 0) + 1
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
            if sched is not None:
                sched.step()
            dt = round(time.perf_counter() - e0, 6)
            for k in range(S):
                entry = {"task": t, "epoch": epoch, **{key: float(v) / counts[k][key] for key, v in sums[k].items()},
                         "lr": lr, "time": dt, "batched_seeds": S}
                if not math.isfinite(entry["loss"]):
                    raise ValueError(f"seed {trainers[k].seed}: task {t} epoch {epoch}: the training loss is not finite")
                logs[k].append(entry)
        _write_back(models, params, buffers)
        for k, tr in enumerate(trainers):
            tr._teacher = tr._teacher_pos = None
            method = tr.method
            if method.replay in ("mixed", "paired") and (tr.protocol.memory or tr.protocol.memory_per_class):
                if tr.protocol.memory_per_class:
                    tr.memory.memory_size = tr.protocol.memory_per_class * tr.n_seen
                new = {c: tr.train_indices_of_class(c) for c in range(tr.n_old, tr.n_seen)}
                fn = (lambda i, tr=tr: tr.features_of(i).cpu().numpy()) if tr.memory.selection == "herding" else None
                tr.memory.update(new, features_fn=fn)
            method.after_task(t)
            A[k][t], acc = tr.evaluate()
            step_acc[k].append(acc)
    seconds = time.perf_counter() - t_run
    results = []
    for k, tr in enumerate(trainers):
        metrics = {"step_acc": step_acc[k], **M.summarize(A[k], step_acc[k])}
        if tr.run_dir is not None:
            tr.run_dir.mkdir(parents=True, exist_ok=True)
            (tr.run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in logs[k]))
            write_acc_matrix(tr.run_dir / "acc_matrix.csv", A[k])
            out = {key: None if isinstance(v, float) and not np.isfinite(v) else v for key, v in metrics.items()}
            out["n_test"] = [int(x.size) for x in tr.split_idx["test"]]
            out["train_seconds"] = round(seconds, 3)
            out["batched_seeds"] = S
            (tr.run_dir / "metrics.json").write_text(json.dumps(out, indent=2, allow_nan=False))
        results.append(RunResult(A[k], step_acc[k], metrics, str(tr.run_dir) if tr.run_dir else None, None, seconds,
                                 {"batched_seeds": S}))
    return results


def run_seed_groups(specs, run_rest) -> list[dict]:
    """Sweep results (as :func:`train.sweep.run_one` gives them, in spec order) with the seeds of each
    configuration trained by :func:`fit_batched` where :func:`why_not_batched` allows;
    ``run_rest(specs)`` runs the other specs (single seeds, unbatchable groups)."""
    import dataclasses
    import traceback

    from train.sweep import _configure_logging, prepare_trainer

    groups: dict = {}
    for s in specs:
        groups.setdefault(dataclasses.replace(s, seed=0), []).append(s)
    results: dict[int, dict] = {}
    rest = []
    for group in groups.values():
        if len(group) < 2:
            rest += group
            continue
        _configure_logging(group[0].verbose)
        prepared, group_results = [], []
        for spec in group:
            res = {"method": spec.method, "head": spec.head, "seed": spec.seed, "status": "failed",
                   "run_dir": None, "protocol": spec.protocol}
            try:
                tr = prepare_trainer(spec, res)
            except Exception as e:  # noqa: BLE001 - reported like a failed run
                res.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                tr = None
            group_results.append(res)
            if tr is not None:
                prepared.append((spec, tr, res))
        reason = why_not_batched([tr for _, tr, _ in prepared])
        if reason is not None or any(spec.resume for spec, _, _ in prepared):
            rest += [spec for spec, _, _ in prepared]
            group_results = [r for r in group_results if r not in [p[2] for p in prepared]]
        else:
            try:
                outs = fit_batched([tr for _, tr, _ in prepared])
                for (spec, tr, res), out in zip(prepared, outs):
                    res.update(status="ok", metrics=out.metrics, acc_matrix=out.acc_matrix.tolist(),
                               seconds=round(out.seconds, 3), resumed_from=None, batched_seeds=len(prepared))
            except Exception as e:  # noqa: BLE001
                tb = traceback.format_exc()
                for _, tr, res in prepared:
                    res.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=tb)
                    if tr.run_dir is not None:
                        (tr.run_dir / "error.txt").write_text(tb)
        for res in group_results:
            results[specs.index(next(s for s in group if s.seed == res["seed"]))] = res
    if rest:
        for spec, res in zip(rest, run_rest(rest)):
            results[specs.index(spec)] = res
    return [results[i] for i in range(len(specs))]
