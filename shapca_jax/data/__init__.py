"""The data layer: raw files and contexts -> examples -> TFDS records -> fixed-shape batches.

readers      Twitter CoNLL, MNRE dict literals, JMERE JSON -> `Example`
contexts     context sources (BLIP-2, PGIM, MNRE captioners, generic JSONL) joined by image id
labels       label vocabularies and the BIO span convention
tokenization word pieces, word alignment, joint input, MRE markers, JMERE grid
builders     TFDS builders (array_record, no TensorFlow) and `tfds.data_source` read-back
pipeline     the grain pipeline of length-bucketed batches
summary      the statistics `python -m shapca_jax.data inspect` prints
"""
