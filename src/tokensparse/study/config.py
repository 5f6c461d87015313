"""The study's settings: `DemoConfig` (the demo's short schedule by default) and `study_config()`
(the full study committed in benchmarks/results/study). No torch import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    """Sizes of the study. The defaults are the demo's short schedule; `study_config()` is the full one.

    Each fine-tune epoch draws `finetune_limit` items afresh from all training items (seeded by the
    run's seed and the epoch), each with a fresh canvas. The recipes are the authors', scaled to the
    schedule. DynamicViT: warm-up and a frozen backbone for the first `dynamicvit_warmup_epochs` /
    `backbone_fixed_epochs` (the authors' 5 of 30 each), then the backbone at 0.01x; the predictors'
    lr, 1e-2, was chosen on the validation split (benchmarks/results/dvit_schedule.md, predictor lr
    3e-3 / 1e-2 / 3e-2: 78.18 / 77.98 / 77.04). A-ViT: the authors' lr 5e-4 at batch 512 scaled
    linearly to the batch, their warm-up share, label smoothing 0.1 and drop-path 0.1, from a gate
    centre calibrated to an untrained depth; its loss weights (ponder, prior) and distillation are
    chosen on validation from `avit_grid` in short runs, the chosen setting then trains
    `avit_epochs` with every seed. The fine-tuned baselines train with CE plus logits distillation.
    """

    work: str = "runs/demo"
    report: str = "report"
    teacher: str = "clutter-vit"
    batch_size: int = 128
    finetune_limit: int = 6000
    dynamicvit_warmup_epochs: int = 0
    dynamicvit_ratios: tuple[float, ...] = (0.7,)
    dynamicvit_epochs: int = 2
    # (ratio, epochs) pairs for ratios that need another epoch count than `dynamicvit_epochs` to plateau
    dynamicvit_epochs_at: tuple[tuple[float, int], ...] = ()
    dynamicvit_lr: float = 1e-2
    # The backbone's lr as a multiple of `dynamicvit_lr` once it trains (the authors' 0.01 over 30 epochs);
    # the study's value is chosen on validation by benchmarks/dvit_schedule.py.
    dynamicvit_backbone_lr_scale: float = 0.01
    backbone_fixed_epochs: int = 1
    keep_ratio: float = 0.7  # the headline setting
    # seeds of the headline rows (dense-ft, DynamicViT at keep_ratio, A-ViT's chosen setting); the other
    # rows train with the first
    seeds: tuple[int, ...] = (0,)
    avit_epochs: int = 2
    # the authors' 5e-4 at batch 512, scaled linearly (DeiT's rule) to `batch_size` 128
    avit_lr: float = 1.25e-4
    avit_warmup_epochs: int = 0
    avit_smoothing: float = 0.1
    avit_drop_path: float = 0.1
    # validation items each epoch of A-ViT's full-budget runs read (None: `val_limit`'s). Its inference
    # form (tokens leave the pack, a read-back per block) validates slowly on a GPU shared by a dozen
    # fine-tunes; these per-epoch curves are only drawn, the reported numbers come from the test split.
    avit_val_limit: int | None = None
    avit_prior_depth: int | None = None  # None: 2/3 of the depth (the paper's 8 of 12)
    gate_scale: float = 10.0
    # The untrained mean depth A-ViT starts from: its gate centre is calibrated on validation images so
    # that the untrained model halts there (None: the prior's depth). The authors' DeiT-T centre 30
    # sits in the gate's flat tail here (the depth never moved in 10 epochs: benchmarks/avit_gate_start.py).
    avit_start_depth: float | None = None
    # (ponder weight, prior weight, distillation weight) settings tried in short runs of
    # `avit_grid_epochs` x `avit_grid_limit` items; the authors': (5e-4, 1e-3, 0)
    avit_grid: tuple[tuple[float, float, float], ...] = ((5e-4, 1e-3, 0.0),)
    avit_grid_epochs: int = 2
    avit_grid_limit: int = 6000
    avit_grid_warmup_epochs: int = 0
    # the grid run chosen: highest validation top-1 among those whose trained gates execute this share
    # fewer FLOPs than dense (closest to its middle when none does)
    avit_target_cut: tuple[float, float] = (0.25, 0.35)
    # validation images the gate centres are calibrated on (the start's depth, the moved-gate cuts)
    calibration_images: int = 256
    # secondary curve: the chosen model with its gate centre moved after training to execute these shares fewer
    avit_cuts: tuple[float, ...] = (0.2, 0.3, 0.4)
    # evaluate the object oracle (DynamicViT's counts, the object's patches first): what a ranking can reach
    oracle: bool = True
    baseline_epochs: int = 0  # 0: the baselines are training-free only
    # DiffRate's search (the backbone frozen: the shipped teacher's) at DynamicViT keep_ratio's executed
    # GMACs, `diffrate_epochs` x `finetune_limit` training canvases with the authors' recipe (3 epochs)
    diffrate: bool = False
    diffrate_epochs: int = 3
    # the search's FLOP term as the authors' DeiT-S search weighs a relative FLOP error: their 5 x
    # (GFLOPs - target)^2 is in absolute GFLOPs, 10^4 times weaker on this 0.046-GMAC model than on DeiT-S
    diffrate_deit_s_scaled: bool = True
    # Also fine-tune the dense model on DynamicViT's data and schedule at the backbone's lr (`dense-ft`): the
    # control that says how much of a fine-tune's accuracy is only more training of the dense model.
    dense_finetune: bool = False
    baseline_lr: float = 1e-4
    curve_ratios: tuple[float, ...] = (0.5, 0.7, 0.9)
    val_limit: int | None = 2000
    test_limit: int | None = 2000
    bench_batch: int = 64
    bench_rounds: int = 10
    device: str = "cpu"
    workers: int = 0  # data-loading processes per fine-tune (the data do not depend on it)
    seed: int = 0
    command: str = "tokensparse demo"
    # False: train nothing, report the fine-tunes already finished in `work` (an interim report that
    # names the missing runs)
    train: bool = True
    # train only the runs named here (work-folder names, e.g. "dynamicvit@0.7", "avit-seed1"); the others
    # are used when finished and missing otherwise. None: every run. Two processes can so share the work.
    only: tuple[str, ...] | None = None

    def dynamicvit_epochs_for(self, ratio: float) -> int:
        """The epochs DynamicViT at `ratio` fine-tunes: its `dynamicvit_epochs_at` entry, else the common count."""
        return dict(self.dynamicvit_epochs_at).get(ratio, self.dynamicvit_epochs)


# The teacher saw 34 epochs x 55000 canvases = 1.87M (src/tokensparse/models/clutter_vit.md). The authors'
# fine-tunes are a share of DeiT's 300-epoch pre-training: DynamicViT 30 epochs (1/10), A-ViT 100 (1/3).
TEACHER_CANVASES = 34 * 55000


def study_config(**overrides) -> DemoConfig:
    """The full study (`tokensparse demo --study`, committed in benchmarks/results/study)."""
    base = dict(
        work="runs/study",
        report="benchmarks/results/study",
        # DynamicViT and dense-ft: 12 x 16000 = 192k canvases (>= 1/10 of the teacher's); warm-up and the
        # frozen backbone 2 of 12 epochs (the authors' 5 of 30)
        finetune_limit=16000,
        dynamicvit_ratios=(0.5, 0.7, 0.9),
        dynamicvit_epochs=12,
        dynamicvit_warmup_epochs=2,
        backbone_fixed_epochs=2,
        dynamicvit_backbone_lr_scale=0.01,
        dense_finetune=True,
        seeds=(0, 1, 2),
        # A-ViT: 40 x 16000 = 640k canvases (>= 1/3 of the teacher's), warm-up 2 of 40 (the authors' 5 of 100)
        avit_epochs=40,
        avit_warmup_epochs=2,
        avit_val_limit=1000,
        # the grid: ponder x prior weights around the authors' (5e-4, 1e-3), with and without distillation,
        # each 4 x 8000 canvases with 1 warm-up epoch
        avit_grid=tuple(
            (ponder, prior, distill)
            for distill in (0.0, 0.5)
            for prior in (1e-3, 1e-2)
            for ponder in (5e-5, 1.5e-4, 5e-4)
        ),
        avit_grid_epochs=4,
        avit_grid_limit=8000,
        avit_grid_warmup_epochs=1,
        baseline_epochs=1,
        # DiffRate's search: the authors' 3 epochs, 48k canvases (2.6% of the teacher's; theirs 3 ImageNet
        # epochs, 1% of DeiT's 300)
        diffrate=True,
        diffrate_epochs=3,
        curve_ratios=(0.5, 0.7, 0.9),
        avit_cuts=(0.2, 0.3, 0.4, 0.5, 0.6),
        val_limit=None,
        test_limit=None,
        bench_rounds=30,
        command="tokensparse demo --study",
    )
    return DemoConfig(**{**base, **overrides})
