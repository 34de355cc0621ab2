"""`histocsc evaluate`: inference outputs against truth (phantom masks, QuPath GeoJSON, IHC)."""
