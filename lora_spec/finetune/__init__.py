"""The main job: fine-tune a local Hugging Face encoder with LoRA, then export, merge and verify it in ONNX.

`lora_spec.finetune.pipeline.run` is the `lora-spec finetune` command without its argument parsing.
"""
