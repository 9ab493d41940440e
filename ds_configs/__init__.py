"""DeepSpeed JSON templates: zero{0,1,2,3}.json and zero3_offload.json.

Kept at the top of a checkout and installed as the package ``mats_scale.ds_configs`` (setup.py maps
it), read through :func:`mats_scale.resources.ds_template`.
"""
