"""A small FSDP2 trainer that reads its batches from a tokenfeed server and checkpoints its cursors."""
