"""Storage and format conversion of finished models.

- ``shared``: the folder format of a model whose layers share weights (each shared tensor
  stored once), its writer and its reader;
- ``unfold``: a shared model written out as a standard one.
"""
