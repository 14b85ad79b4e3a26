"""One module per paper: pure, jit/grad/vmap-safe losses and the paper's extra stages."""
