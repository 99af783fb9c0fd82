"""Building blocks that several methods share; a method imports these, never another method's package (a test
enforces it).

- ``tiling``: run square-input code on wide (S×W) images: cut into tiles, stitch the maps, average the scores.
- ``scoring``: token-to-map scoring: abnormal probability against [normal, abnormal] text states, patch maps,
  image scores over views, stitched per-pixel logits.
- ``prompts``: the prompt base (one sentence API: ``sentences(prompt_name, domain)``) and the state × template
  ensemble of WinCLIP and APRIL-GAN.
- ``text``: text states of a prompt set per category, encoded once and kept per device
  (``CLIPAnomalyModel.text_states``).
- ``losses``: focal and Dice losses for trained methods.
- ``smoothing``: Gaussian smoothing of maps.

The encoder's public token forwards are on :class:`~anovl.backbones.ValueWiseViT`: ``plain_tokens`` (the tower's
ordinary patch tokens after any block), ``forward_intermediates`` (those and the image embedding) and ``vv_tokens``
(the V-V path's).
"""
