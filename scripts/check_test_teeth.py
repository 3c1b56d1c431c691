"""Check that the tests have teeth: plant known bugs, one at a time, in a temporary copy of the repository and
check that the tests written for each guarantee fail.

Each mutant below is an exact text replacement in one file (it must match exactly once, so a mutant that no longer
applies is reported, not silently skipped) plus the tests that guard that guarantee; only those tests run. A mutant
is *caught* when its tests fail (pytest exit status 1). The working tree is never modified.

    python scripts/check_test_teeth.py                 # every mutant (a few minutes on 2 CPU cores)
    python scripts/check_test_teeth.py --list          # names and what each plants
    python scripts/check_test_teeth.py --only stale-mask-cache --only ties-by-position
    python scripts/check_test_teeth.py --baseline      # first check that the selected tests pass unmutated

Exit status 0 when every mutant is caught, 1 otherwise. Not part of CI (it runs pytest once per mutant).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str                               # the guarantee the planted bug breaks
    file: str                              # path relative to the repository root
    edits: tuple[tuple[str, str], ...]     # (exact old text, new text), each old text occurring exactly once
    tests: tuple[str, ...]                 # pytest node ids that must fail


EX = "chex_core/explorer.py"
T_EX = "tests/test_explorer.py"
T14 = "tests/test_engine_checkpoint_cli.py::"
T_CO = "tests/test_coupled.py::"
MUTANTS = [
    Mutant("restore-skips-producer", "regrown channels come back with their MRU producer filters", EX,
           (("                idx = entry[\"index\"].to(t.device)\n",
             "                idx = entry[\"index\"].to(t.device)\n"
             "                if s.role == \"producer\":\n                    continue\n"),),
           (f"{T_EX}::test_every_restored_tensor_equals_an_independent_copy",)),
    Mutant("restore-skips-running-stats", "regrown channels get their norm running statistics back", EX,
           (("                idx = entry[\"index\"].to(t.device)\n",
             "                idx = entry[\"index\"].to(t.device)\n"
             "                if s.tensor.startswith(\"running\"):\n                    continue\n"),),
           (f"{T_EX}::test_every_restored_tensor_equals_an_independent_copy",)),
    Mutant("mru-not-checkpointed", "a resume continues with the MRU store", EX,
           (('"mru": {k: {kk: vv.clone() for kk, vv in e.items()} for k, e in self.mru.items()},',
             '"mru": {},'),),
           (f"{T_EX}::test_resume_equals_straight_run",)),
    Mutant("broadcast-masks-noop", "rank 0's masks are the masks of every rank", EX,
           (("        packed = torch.cat(", "        return\n        packed = torch.cat("),),
           ("tests/test_distributed_explorer.py::test_two_ranks_agree_after_every_event",)),
    Mutant("norm-stats-not-synced", "rank 0's norm statistics are stored and restored on every rank", EX,
           (('        """Rank 0\'s running statistics of the groups\' norms (they are stored in the MRU store and '
             'restored)."""\n        if not dist_utils.is_dist():',
             '        """Rank 0\'s running statistics of the groups\' norms (they are stored in the MRU store and '
             'restored)."""\n        if True:'),),
           ("tests/test_distributed_explorer.py::test_two_ranks_agree_after_every_event",)),
    Mutant("non-finite-flags-local", "a NaN on one rank stops every rank with the same error", EX,
           (("bad = dist_utils.all_reduce_max(torch.stack(flags).to(torch.int32).cpu())",
             "bad = torch.stack(flags).to(torch.int32).cpu()"),),
           ("tests/test_distributed_explorer.py::test_two_ranks_agree_after_every_event",)),
    Mutant("stale-mask-cache", "masks keep applying after model.to()/.double()/.half()", EX,
           (("        if not self._masker.is_current():\n", "        if False:\n"),),
           (f"{T_EX}::test_masks_apply_after_the_model_is_moved",)),
    Mutant("no-finite-check", "NaN/Inf at an event is one clear error naming the tensor", EX,
           (("        self._check_finite(step)\n        self._sync_norm_buffers()\n        delta",
             "        self._sync_norm_buffers()\n        delta"),),
           (f"{T_EX}::test_non_finite_weights_are_one_error_naming_the_tensor",)),
    Mutant("css-ignores-live-set", "CSS keeps live channels when k exceeds the rank", "chex_core/css.py",
           (("    if live is None:\n", "    if True:\n"),),
           ("tests/test_core_math.py::test_css_keeps_live_channels_when_k_exceeds_the_rank",
            "tests/test_core_math.py::test_css_fill_beyond_the_live_channels_is_ranked_and_deterministic")),
    Mutant("fill-unranked", "the fill beyond the live channels follows the remembered filters", "chex_core/css.py",
           (("    xr = x if restored is None else weight_matrix(restored)\n", "    xr = x\n"),),
           ("tests/test_core_math.py::test_css_fill_beyond_the_live_channels_is_ranked_and_deterministic",)),
    Mutant("floor-after-cut", "the global budget is exact (the floor is inside the cut)", "chex_core/allocate.py",
           (("        top = np.lexsort((np.arange(size), -v))[:min(size, min_channels)]",
             "        top = np.lexsort((np.arange(size), -v))[:0]"),
            ("    return [size - int(d) for size, d in zip(sizes, dropped)]",
             "    return _floor([size - int(d) for size, d in zip(sizes, dropped)], sizes, min_channels)")),
           ("tests/test_core_math.py::test_global_budget_is_exact_with_the_floor_inside_the_cut",
            f"{T_EX}::test_event_budget_follows_schedule")),
    Mutant("ties-by-position", "equal |gamma| are cut evenly across layers", "chex_core/allocate.py",
           (("    order = np.lexsort((gid_a, frac_a, values_a))",
             "    order = np.lexsort((np.arange(values_a.size), values_a))"),),
           ("tests/test_core_math.py::test_equal_gammas_are_cut_evenly_across_layers",)),
    Mutant("no-second-moment-fill", "a regrown channel's first Adam step is not outsized", "chex_core/masking.py",
           (("            v.masked_fill_(regrown, v[stay].mean())", "            v.masked_fill_(regrown, 0.0)"),),
           (f"{T_EX}::test_first_adam_update_of_a_regrown_channel_is_not_outsized",
            "tests/test_physical.py::test_optimizer_state_transplanted_by_index")),
    Mutant("fill-mean-over-all-entries", "compact and masked training fill regrown Adam state alike",
           "chex_core/masking.py",
           (("            v.masked_fill_(regrown, v[stay].mean())", "            v.masked_fill_(regrown, v.mean())"),),
           ("tests/test_physical_parts.py::test_compact_and_masked_adam_give_regrown_channels_the_same_state",
            "tests/test_physical_parts.py::test_fill_regrown_second_moments_touches_only_regrown_entries")),
    Mutant("compact-fill-skipped", "compact training gives regrown channels the masked mode's Adam state",
           "chex_core/physical/training.py",
           (("        fill_regrown_second_moments(self.optimizer, self._liveness_changes(", "        (("),),
           ("tests/test_physical_parts.py::test_compact_and_masked_adam_give_regrown_channels_the_same_state",
            "tests/test_physical.py::test_optimizer_state_transplanted_by_index")),
    Mutant("optimizer-state-not-masked", "pruned channels' momentum stays exactly zero", "chex_core/masking.py",
           (("            torch._foreach_mul_(self._data, self._mults)\n        mask_optimizer_state(optimizer, "
             "self.pairs)", "            torch._foreach_mul_(self._data, self._mults)"),),
           (f"{T_EX}::test_start_density_and_masks_stay_dead_under_momentum_and_weight_decay",)),
    Mutant("transplant-drops-state", "compact rebuilds move optimizer state by channel index",
           "chex_core/physical/optimizer.py",
           (("moved[k] = transplant(old, v) if transplant is not None and old is not p else v",
             "moved[k] = torch.zeros(p.shape, dtype=v.dtype) if old is not p else v"),),
           ("tests/test_physical.py::test_optimizer_state_transplanted_by_index",)),
    Mutant("scheduler-not-repointed", "the LR schedule keeps driving the rebuilt optimizer",
           "chex_core/physical/scheduler.py",
           (("    scheduler.optimizer = optimizer\n", "    pass\n"),),
           ("tests/test_physical.py::test_trainstep_and_lr_scheduler_follow_rebuilds",
            "tests/test_physical_parts.py::test_scheduler_patch_matches_torch_internals")),
    Mutant("compact-export-wrong-columns", "compact export equals the masked model", "chex_core/compact.py",
           (("        new.weight.copy_(conv.weight[o.to(dev)][:, i.to(dev)])",
             "        new.weight.copy_(conv.weight[o.to(dev)][:, :len(i)])"),),
           ("tests/test_compact_flops.py",)),
    Mutant("uniform-instead-of-importance", "regrowth prefers channels the kept ones explain poorly",
           "chex_core/regrow.py",
           (("        probs = torch.softmax(eps, dim=0)", "        probs = torch.ones_like(eps)"),),
           ("tests/test_core_math.py::test_importance_prefers_channels_outside_the_kept_span",)),
    Mutant("overflow-run-never-aborts", "N AMP overflow steps in a row abort (T14)", "chex_core/engine.py",
           (("            if self._consecutive_skips >= self.max_consecutive_skips:", "            if False:"),),
           (T14 + "test_consecutive_overflow_steps_abort_and_a_good_step_resets_the_count",)),
    Mutant("overflow-count-not-reset", "only overflow steps *in a row* abort (T14)", "chex_core/engine.py",
           (("        else:\n            self._consecutive_skips = 0\n", "        else:\n            pass\n"),),
           (T14 + "test_consecutive_overflow_steps_abort_and_a_good_step_resets_the_count",)),
    Mutant("no-loss-check", "a non-finite loss stops training before the step (T14)", "chex_core/engine.py",
           (("        if not math.isfinite(sum(reduced.values())):", "        if False:"),),
           (T14 + "test_an_injected_inf_loss_stops_before_the_step",
            T14 + "test_non_finite_loss_raises_with_the_loss_dict")),
    # --- coupled residual groups (--chex-residual, issue 18) ---
    Mutant("coupled-layout-first-producer-only", "every producer and norm of a stream is masked, stored, sliced",
           "chex_core/layout.py",
           (('    slices = (_role_slices("producer", group.producers) + _role_slices("norm", group.norms)',
             '    slices = (_role_slices("producer", group.producers[:1]) + _role_slices("norm", group.norms[:1])'),),
           (f"{T_CO}test_dead_residual_channels_stay_zero_in_every_slot_and_in_the_stream",
            f"{T_CO}test_compact_equals_masked_in_float64_and_rebuilds_from_its_spec")),
    Mutant("coupled-stream-misses-next-downsample", "a stream's consumers include the next stage's shortcut",
           "chex_core/groups.py",
           (('                current.readers.append(f"{bname}.downsample.0")\n', ""),),
           (f"{T_CO}test_residual_groups_of_torchvision_resnets",
            f"{T_CO}test_compact_equals_masked_in_float64_and_rebuilds_from_its_spec")),
    Mutant("coupled-importance-first-norm", "a stream channel ranks by the mean |gamma| of its norms", EX,
           (("            out.append(gam.mean(dim=0) * mask.to(gam.device))",
             "            out.append(gam[0] * mask.to(gam.device))"),),
           (f"{T_CO}test_importance_is_the_mean_gamma_and_css_reads_every_producer",)),
    Mutant("coupled-importance-rss", "a stream channel ranks by the mean |gamma| (not the root-sum-square)", EX,
           (("            out.append(gam.mean(dim=0) * mask.to(gam.device))",
             "            out.append(gam.pow(2).sum(0).sqrt() * mask.to(gam.device))"),),
           (f"{T_CO}test_importance_is_the_mean_gamma_and_css_reads_every_producer",)),
    Mutant("coupled-css-unnormalised", "CSS weighs a stream's producers equally (unit Frobenius norm each)", EX,
           (("            blocks.append(w / norm if norm > 0 else w)", "            blocks.append(w)"),),
           (f"{T_CO}test_importance_is_the_mean_gamma_and_css_reads_every_producer",)),
    Mutant("coupled-single-producer-rescaled", "internal groups decide on their producer's weight as before", EX,
           (("        if len(weights) == 1:\n            return weights[0]", "        if False:\n            pass"),),
           (f"{T_CO}test_importance_is_the_mean_gamma_and_css_reads_every_producer",)),
    Mutant("coupled-restore-skips-extra-producers", "a regrown stream channel gets back every producer's filter", EX,
           (("                idx = entry[\"index\"].to(t.device)\n",
             "                idx = entry[\"index\"].to(t.device)\n"
             "                if s.role == \"producer\" and s.index:\n                    continue\n"),),
           (f"{T_EX}::test_every_restored_tensor_equals_an_independent_copy",)),
    Mutant("coupled-broadcast-skips-residual", "rank 0's stream masks are every rank's", EX,
           (("            self.masks[g.name] = chunk.clone()",
             "            if g.kind != \"residual\":\n                self.masks[g.name] = chunk.clone()"),),
           ("tests/test_distributed_explorer.py::test_two_ranks_agree_after_every_event",)),
    Mutant("coupled-checkpoint-drops-stream-mru", "a resume continues with the streams' MRU store", EX,
           (('"mru": {k: {kk: vv.clone() for kk, vv in e.items()} for k, e in self.mru.items()},',
             '"mru": {k: {kk: vv.clone() for kk, vv in e.items()} for k, e in self.mru.items() '
             'if not k.endswith(".residual")},'),),
           (f"{T_CO}test_resume_mid_run_is_bitwise",)),
    Mutant("coupled-round-to-skips-streams", "--round-to rounds the streams' widths too", EX,
           (("        return [min(g.size, -(-c // r) * r) for c, g in zip(counts, self.groups)]",
             "        return [c if g.kind == \"residual\" else min(g.size, -(-c // r) * r) "
             "for c, g in zip(counts, self.groups)]"),),
           (f"{T_CO}test_budget_is_exact_with_and_without_round_to",)),
    Mutant("coupled-macs-classifier-unlinked", "MacsModel credits a narrowed last stream in the classifier",
           "chex_core/budget.py",
           (("terms.append(_Term(rows, in_of.get(name), m.in_features, None, m.out_features))",
             "terms.append(_Term(rows, None, m.in_features, None, m.out_features))"),),
           (f"{T_CO}test_compact_equals_masked_in_float64_and_rebuilds_from_its_spec",
            f"{T_CO}test_budget_is_exact_with_and_without_round_to")),
    Mutant("coupled-compact-skips-classifier", "compact export narrows a classifier reading a stream",
           "chex_core/compact.py",
           (("        return _new_linear_from(conv, dims, copy_values)", "        return conv"),),
           (f"{T_CO}test_compact_equals_masked_in_float64_and_rebuilds_from_its_spec",)),
    Mutant("coupled-spec-without-streams", "apply_width_spec rebuilds the streams a spec names",
           "chex_core/compact.py",
           (("    if set(spec) <= {g.name for g in groups}:", "    if True:"),),
           (f"{T_CO}test_compact_equals_masked_in_float64_and_rebuilds_from_its_spec",)),
    Mutant("coupled-linear-size-stale", "compact training keeps a narrowed classifier's in_features true",
           "chex_core/physical/surgery.py",
           (("        mod.out_features, mod.in_features = int(mod.weight.shape[0]), int(mod.weight.shape[1])",
             "        pass"),),
           ("tests/test_physical.py::test_compact_follows_masked_trajectory",)),
    Mutant("coupled-flag-conflict-unchecked", "--chex-residual with --chex-prune-downsample is a one-line exit 2",
           "chex_core/cli.py",
           (('    if getattr(args, "chex_residual", False) and getattr(args, "chex_prune_downsample", False):',
             "    if False:"),),
           (f"{T_CO}test_flag_conflict_is_one_line_exit_2",)),
    Mutant("coupled-flag-not-wired", "--chex-residual turns the residual groups on in the tasks", "chex_core/cli.py",
           (('    residual = bool(getattr(args, "chex_residual", False))', "    residual = False"),),
           ("tests/test_cls.py::test_residual_flag_reaches_a_budget_internal_groups_cannot_and_exports_it",)),
    Mutant("coupled-det-head-forgotten", "DET: the heads reading layer3 narrow with its stream", "DET/model.py",
           (('HEAD_CONSUMERS = {"layer3": ("additional_blocks.0.0", "loc.0", "conf.0")}',
             'HEAD_CONSUMERS = {"layer3": ("additional_blocks.0.0", "conf.0")}'),),
           ("tests/test_det.py::test_residual_flag_narrows_the_heads_and_the_export_equals_the_masked_model",)),
    Mutant("coupled-seg-lateral-forgotten", "SEG: each FPN lateral narrows with the stage it reads", "SEG/model.py",
           (('FPN_LATERALS = {f"layer{i + 1}": (f"backbone.fpn.inner_blocks.{i}.0",) for i in range(4)}',
             'FPN_LATERALS = {f"layer{i + 1}": (f"backbone.fpn.inner_blocks.{i}.0",) for i in range(1, 4)}'),),
           ("tests/test_seg.py::test_residual_flag_narrows_the_fpn_laterals_and_the_export_equals_the_masked_model",)),
    Mutant("coupled-zeros-first-norm-only", "a masked checkpoint's stream channel is pruned only if every norm is 0",
           "CLS/model.py",
           (("        for n in g.norms:\n", "        for n in g.norms[:1]:\n"),),
           (f"{T_CO}test_zeroed_stream_channels_are_found_in_a_masked_checkpoint",)),
    Mutant("coco-empty-crashes", "COCO eval of empty predictions warns and reports zeros (T20)",
           "chex_tasks/coco.py",
           (("    if not results:\n", "    if False:\n"),),
           ("tests/test_coco.py::test_empty_predictions_warn_and_return_zero",)),
]


def _repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return [f for f in out.stdout.splitlines() if (REPO / f).is_file()]


def _copy_repo(dest: Path) -> None:
    for rel in _repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def _apply(copy: Path, m: Mutant) -> str | None:
    """Plant ``m`` in ``copy``; returns why it cannot be planted, or None."""
    path = copy / m.file
    text = path.read_text()
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            return f"the text to replace occurs {n} times in {m.file} (the code changed: update the mutant)"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def _pytest(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s"
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this mutant (repeatable; see --list)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--baseline", action="store_true",
                   help="first run the selected mutants' tests on the unmutated copy (they must pass)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per pytest run (default 600)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
    if unknown:
        p.error(f"--only: unknown mutant(s) {unknown}; see --list")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name:32s} {m.file:34s} breaks: {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="chex-teeth-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_repo(copy)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
            rc, last = _pytest(copy, tests, args.timeout)
            print(f"baseline (unmutated) {'passes' if rc == 0 else 'FAILS'}: {last}", flush=True)
            if rc != 0:
                return 1
        missed = 0
        for m in selected:
            original = (copy / m.file).read_text()
            t0 = time.monotonic()
            problem = _apply(copy, m)
            if problem:
                verdict, last = "NOT APPLIED", problem
            else:
                rc, last = _pytest(copy, m.tests, args.timeout)
                verdict = "caught" if rc == 1 else f"NOT CAUGHT (pytest exit {rc})"
            (copy / m.file).write_text(original)
            missed += verdict != "caught"
            print(f"{m.name:32s} {verdict:12s} {time.monotonic() - t0:6.1f} s  {last}", flush=True)
    print(f"{len(selected) - missed}/{len(selected)} planted bugs caught")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
