"""ModelScope text-to-video (diffusers ``UNet3DConditionModel``).

Temporal attention lives in ``transformer_in`` and every ``temp_attentions.*``
(``TransformerTemporalModel``): both ``attn1`` and ``attn2`` of their blocks are
self-attention over frames. Heads are C/64 in the real model.
"""

from .diffusers_video import DiffusersFolder, DiffusersVideoAdapter
from .structure import AttentionPatterns


class ModelScopeAdapter(DiffusersVideoAdapter):
    family = "modelscope"
    checkpoint = DiffusersFolder("UNet3DConditionModel", presets={
        "tiny": {
            "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
            "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
            "cross_attention_dim": 32, "attention_head_dim": 8,
        },
    })
    structure = AttentionPatterns(("transformer_in.*.attn[12]", "*temp_attentions.*.attn[12]"), "unet")
