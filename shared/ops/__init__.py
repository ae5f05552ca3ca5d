"""Operating the system: `arb health`, `arb streams`, `arb monitor`, and where logs are kept."""
