"""mmfl: multi-modal federated prompt tuning on frozen CLIP-style backbones."""
