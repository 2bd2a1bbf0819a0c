"""CogVideo checkpoints: SwissArmyTransformer folders, ``model_config.json`` (SAT
arguments), ``latest`` (the iteration) and ``<iter>/mp_rank_00_model_states.pt``
holding ``{'module': state_dict}`` with SAT's key names. The module tree of ``network``
keeps SAT's names for everything but the mixins, which live inside each layer
(``SAT_MIXIN_KEYS`` maps them both ways), so a layer owns its temporal channel.
And the presets: a tiny model, and the real sizes for counting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...artifacts import atomic_path
from ...errors import CheckpointError
from ...weights import NUMPY_ARRAY_GLOBALS, load_into, load_state_dict, read_json
from ..loading import CheckpointFormat, ModelBundle
from .network import CogVideoConfig, CogVideoModel

SAT_CONFIG = "model_config.json"
SAT_LATEST = "latest"
SAT_WEIGHTS = "mp_rank_00_model_states.pt"

# (SAT key prefix, our key prefix); {l} is the layer index. All other keys are the same in both.
SAT_MIXIN_KEYS = (
    ("mixins.attention_plus.query_key_value.{l}.", "transformer.layers.{l}.temporal.query_key_value."),
    ("mixins.attention_plus.dense.{l}.", "transformer.layers.{l}.temporal.dense."),
    ("mixins.attention_plus.attn_distribution.{l}", "transformer.layers.{l}.temporal.attn_distribution"),
    ("mixins.extra_position_embedding.position_embeddings.", "extra_position_embeddings."),
)
# SAT's one vocabulary table; here its image rows and the rest (``Vocabulary``).
SAT_VOCABULARY = "transformer.word_embeddings.weight"
VOCABULARY_PARTS = ("transformer.word_embeddings.image", "transformer.word_embeddings.text")


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for source, target in pairs:
        match = re.match(re.escape(source).replace(re.escape("{l}"), r"(?P<l>\d+)"), key)
        if match:
            return target.format(l=match.groupdict().get("l", "")) + key[match.end():]
    return key


def sat_to_ours(key: str) -> str:
    return _rename(key, list(SAT_MIXIN_KEYS))


def ours_to_sat(key: str) -> str:
    return _rename(key, [(ours, sat) for sat, ours in SAT_MIXIN_KEYS])


def sat_weights_path(folder: Path) -> Path:
    latest = folder / SAT_LATEST
    if not latest.is_file():
        raise CheckpointError(f"{folder}: no '{SAT_LATEST}' file (a SwissArmyTransformer checkpoint folder has "
                              f"{SAT_CONFIG}, {SAT_LATEST} and <iteration>/{SAT_WEIGHTS})")
    iteration = latest.read_text().strip()
    path = folder / iteration / SAT_WEIGHTS
    if not iteration or "/" in iteration or not path.is_file():
        raise CheckpointError(f"{latest}: names iteration {iteration!r}, but {path} does not exist")
    return path


def read_sat_state(path: Path, image_vocab_size: int) -> dict[str, torch.Tensor]:
    """The ``module`` state dict of a SAT checkpoint, renamed to our keys and made float32.

    The file may hold what SAT's ``save_checkpoint`` stores beside it (iteration, numpy/torch RNG states,
    lr-scheduler and optimizer state): it is unpickled without code and left unused.
    """
    checkpoint = load_state_dict(path, container_key="module", allowed_globals=NUMPY_ARRAY_GLOBALS)
    state = {sat_to_ours(k): v.float() for k, v in checkpoint.items()}
    if SAT_VOCABULARY not in state:
        raise CheckpointError(f"{path}: missing key {SAT_VOCABULARY!r}")
    table = state.pop(SAT_VOCABULARY)
    state[VOCABULARY_PARTS[0]], state[VOCABULARY_PARTS[1]] = table[:image_vocab_size], table[image_vocab_size:]
    return state


def save_sat(model: CogVideoModel, folder: Path, iteration: int = 1) -> None:
    """Write ``model`` as a SwissArmyTransformer checkpoint folder (SAT key names)."""
    weights = folder / str(iteration) / SAT_WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {ours_to_sat(k): v.detach().clone() for k, v in model.state_dict().items()}
    state[SAT_VOCABULARY] = torch.cat([state.pop(part) for part in VOCABULARY_PARTS])
    with atomic_path(weights) as tmp:
        torch.save({"module": state}, tmp)
    with atomic_path(folder / SAT_CONFIG) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=2))
    with atomic_path(folder / SAT_LATEST) as tmp:
        tmp.write_text(str(iteration))


# The real sizes: CogView2's 48 x 3072 transformer with 48 heads, 64 text tokens + 5 frames of 20 x 20.
FULL_SIZE = {"num_layers": 48, "hidden_size": 3072, "num_attention_heads": 48, "vocab_size": 150010,
             "image_vocab_size": 20000, "boi_token_id": 150000, "pad_token_id": 20003, "layout": [64, 464, 2064],
             "max_sequence_length": 912, "additional_seqlen": 2000, "frame_position_offset": 512}


class SatFolder(CheckpointFormat):
    presets = {
        "tiny": {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 320,
                 "image_vocab_size": 256, "boi_token_id": 310, "pad_token_id": 259, "layout": [8, 72, 328],
                 "max_sequence_length": 80, "additional_seqlen": 256, "frame_position_offset": 16},
        "full": FULL_SIZE,
        # The full preset with 3 of its 48 layers, for machines that cannot hold its 31 GB of fp32 weights:
        # each layer's arithmetic (and its speedup from pruning) is the real one.
        "full-3-layers": {**FULL_SIZE, "num_layers": 3},
    }

    def build(self, config):
        return CogVideoModel(CogVideoConfig.from_dict(config, "config"))

    def weights_files(self, folder):
        return [folder / SAT_CONFIG, folder / SAT_LATEST, sat_weights_path(folder)]

    def folder_config(self, folder):
        return CogVideoConfig.from_dict(read_json(folder / SAT_CONFIG), str(folder / SAT_CONFIG)).to_dict()

    def load_folder(self, folder):
        config = self.folder_config(folder)
        model = self.build(config).eval()
        weights = sat_weights_path(folder)
        load_into(model, read_sat_state(weights, model.config.image_vocab_size), weights)
        return ModelBundle(model, config, f"checkpoint {folder}", random_weights=False)
