"""Data layer: decode and validate images, turn raw archives into Parquet datasets, stream them with Ray Data."""
