"""Generated code of tokenfeed.v1 (see ../tokenfeed.proto; never edited by hand)."""
