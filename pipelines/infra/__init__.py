"""What every stage stands on: where files live (``layout``), how they are written
(``storage``: atomic), read in chunks (``geotable``, ``vectors``), the Sentinel-2 grid
and tiling (``grid``, ``tiling``), progress lines, which errors are worth a retry
(``errors``), the data contracts of the published tables (``checks``), and the health
checks behind ``asmwatch doctor`` and ``asmwatch probe`` (``integrity``, ``probe``).
"""
