"""What the tests share: ``models`` (tiny transformers, skills, the reference stitch), ``modules``
(small LightningModules and loaders for the callbacks), ``banks`` (manifests and skill files as an attacker
rewrites them), ``ddp_teardown`` (the DDP child scripts' orderly exit)."""
