//! `sparkla-sandbox`: the per-session launcher of the sandbox runtime. Spawned by the
//! runtime with its spec in `SPARKLA_SANDBOX_SPEC`; not meant to be run by hand.

fn main() {
    sparkla_runtime::sandbox::launcher::main()
}
