"""The embedded worlds' own pretrained stand-in models: what the precompute experts load by path on
the synthetic worlds.

A tiny ViT (`vit` for `shapes`, `captions_vit` for `tabletop`), OPT and RoBERTa (`lm`) and the label experts' and video encoder's stand-ins
(`depth`, `seg`, `objdet`, `timesformer`), all trained by one loop (`loop.train`), each held to the
bar it states (`gates`); `pretrain.pretrain_all` makes them all, `pretrain-shapes` (`cli`) is its
command. Nothing here imports Ray: this is not a precompute stage, it makes what a stage loads.
Importing the package itself imports nothing heavy; import the module you need.
"""

WORLDS = ("tabletop", "shapes")  # the image worlds `pretrain_all` makes models for; the first is the default
