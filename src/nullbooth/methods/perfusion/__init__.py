"""Perfusion (Tewel et al., SIGGRAPH 2023): key-locked, gated rank-1 edits of the cross-attention K/V projections.

Each module has one job, importing only from those above it::

    covariance   C and C⁻¹: the shipped CLIP ViT-L/14 matrix, text second moments, default_covariance + cache,
                 and where a run's C comes from (resolve_covariance)
    loss         the mask-weighted diffusion loss
    concept      the concept token, its superclass ids, ConceptTokenEmbedding
    context      PerfusionContext / RowPlan: which rows hold a concept, their superclass encodings
    module       Rank1EditModule (eq. 3: W e − s·W i* + σ((s − β)/τ)·o*), merge_rank1_edit_modules
    wiring       rank-1 edits onto / off a UNet's cross-attention
    files        PerfusionConcept and concept files
    editor       PerfusionEditor: attach / train / save / load / detach on a pipeline
    compat       lucidrains/perfusion-pytorch's names, for drop-in use
    generation   concept files for ``nullbooth generate`` / ``evaluate``, with the C they were trained with
    subjects     one concept per subject of a run, and every config problem with it
    masks        subject masks aligned to the instance images, at latent size
    method       ``method: perfusion`` for ``nullbooth train``
"""
