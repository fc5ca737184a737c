"""What the tests share: ``models`` (tiny transformers, skills, the reference stitch), ``modules``
(small LightningModules and loaders for the callbacks), ``ddp_teardown`` (the DDP child scripts' orderly exit)."""
