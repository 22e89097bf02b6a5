"""The Taiyi recipe reproduced in miniature on the 山水 world: tokenizer, towers, evaluation."""
