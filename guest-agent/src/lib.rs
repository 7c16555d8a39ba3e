//! The agent's mirror logic (how a watchable mount's tmpfs follows change records) as a
//! library, for the fuzz targets in `fuzz/`. Only with the `fuzzing` feature; without it this
//! library is empty. The binary compiles the same files as its own `mirror` module.

#[cfg(feature = "fuzzing")]
#[path = "mirror"]
#[allow(dead_code, unused_imports)]
pub mod mirror {
    mod moves;
    mod pending;
    mod retired;
    mod sync;
    mod tree;

    #[path = "fuzzing.rs"]
    pub mod fuzzing;
}
