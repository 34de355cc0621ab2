"""Phantom slide pairs: synthetic H&E and IHC sections with known ground truth.

layout (what a case contains) -> cells (nuclei per bin) -> render (pixels per block, H&E or
DAB IHC) -> generate (slides, masks, truth.json, cohort.csv); transform (the known H&E -> IHC
geometry) and truth (reading it back) are what the other stages use.
"""
