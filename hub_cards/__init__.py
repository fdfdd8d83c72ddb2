"""Model cards and publishing of Beagle checkpoints: `render_model_card` / `write_model_card` (`beagle card`) and
`push_checkpoint` (`beagle push`); `export_checkpoint` (`beagle export`) turns a training output into the
Hub-ready folder."""

from .card import (
    DEFAULT_LICENSE,
    TAGS,
    BeagleCardError,
    build_card_data,
    eval_results_from_bench,
    load_bench_results,
    read_beagle_config,
    render_model_card,
    usage_snippet,
    write_model_card,
)
from .export import export_checkpoint
from .push import PlannedFile, PushPlan, check_checkpoint_folder, plan_push, push_checkpoint

__all__ = [
    "DEFAULT_LICENSE",
    "TAGS",
    "BeagleCardError",
    "PlannedFile",
    "PushPlan",
    "build_card_data",
    "check_checkpoint_folder",
    "eval_results_from_bench",
    "export_checkpoint",
    "load_bench_results",
    "plan_push",
    "push_checkpoint",
    "read_beagle_config",
    "render_model_card",
    "usage_snippet",
    "write_model_card",
]
