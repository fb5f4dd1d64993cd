"""Supply-chain artifacts for published images: SBOM, cosign signature, SLSA provenance."""
