"""Built-in node functions of the turn DAG: sources, prompt assembly, slots, llm, speech, publishing."""
