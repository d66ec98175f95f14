"""Dataset readers, the shard writer and the WebDataset training pipeline."""
