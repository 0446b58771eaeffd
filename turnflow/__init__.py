"""turnflow: every voice turn of an AI persona is a Hamilton dataflow declared by YAML recipes."""
