"""AnimateDiff (diffusers ``UNetMotionModel``): an SD UNet with motion modules.

Temporal attention lives in ``motion_modules.*``; their blocks add sinusoidal
frame positions before attention, so clips are at most ``motion_max_seq_length``
frames. The model takes one text embedding per frame.
"""

from .diffusers_video import DiffusersFolder, DiffusersVideoAdapter
from .structure import AttentionPatterns


class AnimateDiffAdapter(DiffusersVideoAdapter):
    family = "animatediff"
    checkpoint = DiffusersFolder("UNetMotionModel", text_per_frame=True, presets={
        "tiny": {
            "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlockMotion", "DownBlockMotion"],
            "up_block_types": ["UpBlockMotion", "CrossAttnUpBlockMotion"],
            "cross_attention_dim": 32, "num_attention_heads": 4, "motion_num_attention_heads": 8,
            "motion_max_seq_length": 32,
        },
    })
    structure = AttentionPatterns(("*motion_modules.*.attn[12]",), "unet")
