"""The MTP drafter (layer `num_hidden_layers` of a DeepSeek-V3 checkpoint) and training of the small default model."""
