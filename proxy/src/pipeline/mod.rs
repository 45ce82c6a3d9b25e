//! The pipeline: deciding what happens to a request -- which service
//! (route, its rules), whether a guard stops it (guard), which subset (split), whether it may go (admit, shed), its tries
//! (forward) and whether it goes again (retry). May import `upstream`, `observe`, `identity`
//! and the leaves, never `edge`.

pub mod admit;
pub mod forward;
pub mod guard;
pub mod mirror;
pub mod retry;
pub mod route;
pub mod rules;
pub mod shed;
pub mod split;
