"""An example kdbench plugin: the `l1_logits` method (kdbench_example_plugin.methods) and its config
(conf/method/l1_logits.yaml)."""
