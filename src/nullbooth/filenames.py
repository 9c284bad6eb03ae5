"""Every file and folder name nullbooth reads or writes, in one place.

Names that other tools own keep those tools' spelling (diffusers' ``pytorch_lora_weights.safetensors``,
the seed layout's ``{feature}_covariance.npy``); names that are ours carry ``nullbooth`` or a
nullbooth-specific stem, so none collides with a peft or diffusers file of another schema.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DATA = Path(__file__).parent / "data"
BUNDLED_MODELS = PACKAGE_DATA / "models"
JUDGE_DIR = PACKAGE_DATA / "judge"
SHIPPED_COVARIANCE = PACKAGE_DATA / "clip_vit_l14_text_covariance.npy"

# a collection run (nullbooth.runs.layout)
MANIFEST = "manifest.json"
PROMPTS_FILE = "prompts.txt"
SUMMED_STATS = Path("stats") / "summed.safetensors"
SUMMED_SPECTRA = Path("stats") / "summed_eig.safetensors"  # eigh of each summed statistic / count, written once
UNET_MOMENTS = "unet_moments.safetensors"  # nullbooth.scope unet: summed input statistics of every other UNet weight
TIMESTEP_SUMS_DIR = Path("stats") / "timestep_sums"
OLD_TIMESTEP_SUMS = Path("stats") / "timestep_sums.safetensors"
COLLECT_CHECKPOINT = Path(".partial") / "checkpoint.safetensors"  # one shard; checkpoint.rank{r}.safetensors per shard
EIG_SUFFIX = "eig.safetensors"  # {feature}_eig.safetensors under storage "eigh"
VISUALIZATIONS_DIR = "visualizations"
RUN_REPORT = "report.html"
ATTENTION_MAPS_DIR = "attention_maps"  # raw maps + images under visualizations/, so pictures can be re-rendered
ATTENTION_INDEX = "index.json"
ATTENTION_TENSORS = "maps.safetensors"
COVARIANCE_STATISTICS = "covariance_statistics.json"  # beside the pictures in covariance_summaries/

# diffusers' own
MODEL_INDEX = "model_index.json"  # marks a pipeline folder

# a training output (nullbooth.training)
ADAPTER_WEIGHTS = "nullbooth_adapter.safetensors"
ADAPTER_CONFIG = "nullbooth_adapter_config.json"
LEGACY_ADAPTER_CONFIG = "adapter_config.json"  # written by nullbooth 0.1.0; peft owns that name
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
CONCEPT_FILE = "perfusion_concept.safetensors"
SUBJECT_CONCEPT_FILE = "perfusion_concept_{}.safetensors"  # subject i of a several-subject Perfusion run
PERFUSION_CONFIG = "perfusion_config.json"
TRAIN_REPORT = "train_report.json"
TRAIN_REPORT_HTML = "train_report.html"
TRAIN_CONFIG = "train_config.json"
MODEL_CARD = "README.md"  # the model card diffusers' training scripts write into an output folder
OFT_DIR = "oft"  # method oft: peft's adapter folder (adapter_config.json + adapter_model.safetensors)
LORA_KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"  # lora_format: kohya (A1111 / ComfyUI keys)
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-<step>/ holding the files below
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_RNG = "rng-{rank}.safetensors"  # one per process, inside checkpoint-<step>/
FULL_UNET_DIR = "unet"  # dreambooth's whole fine-tuned UNet (diffusers' subfolder name)
FULL_TEXT_ENCODER_DIR = "text_encoder"  # dreambooth + train_text_encoder: the whole fine-tuned text encoder
VALIDATION_DIR = "validation"  # validation grids, step-<step>.png
GENERATE_IMAGES_DIR = "images"  # nullbooth generate: <out>/images/, one PNG per (prompt, seed)

# an evaluation (nullbooth.eval)
EVALUATION_DIR = "evaluation"  # nullbooth evaluate's default --output inside a training output
EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
EVALUATION_SAMPLES = "samples.png"

# a folder one nullbooth process writes at a time (nullbooth.locks): holds the holder's PID
LOCK_FILE = ".nullbooth.lock"

# the judge and the world model
JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"
WORLD_MODEL_MARKER = "nullbooth_world_model.json"
