"""nanoWM data: the 1X World Model Challenge v2.0 datasets, read exactly as published, and small
synthetic datasets written in the same layout. Facts: ../shared/1X-DATA.md.

Sections:
  1. tokenized data (compression track): reader, synthetic writer, download
  2. raw video data (sampling track): reader, synthetic writer, latent pre-encoding
  3. command line: `python data.py synthetic --out DIR`, ...
"""

# ---------------------------------------------------------------------------------------------
# 1. Tokenized data (compression track)
# ---------------------------------------------------------------------------------------------

# (end of section 1)

# ---------------------------------------------------------------------------------------------
# 2. Raw video data (sampling track)
# ---------------------------------------------------------------------------------------------

# (end of section 2)

# ---------------------------------------------------------------------------------------------
# 3. Command line
# ---------------------------------------------------------------------------------------------
