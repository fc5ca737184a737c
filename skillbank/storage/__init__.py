"""Skills and the bank: a skill's on-disk format, the durable append-only SkillBank, rank-0 writes."""
