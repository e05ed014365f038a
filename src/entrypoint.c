// Registers extendr's panic hook, then the .Call routines of the Rust crate.
void R_init_scannot_extendr(void *dll);
void register_extendr_panic_hook(void);

void R_init_scannot(void *dll) {
    register_extendr_panic_hook();
    R_init_scannot_extendr(dll);
}
