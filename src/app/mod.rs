//! The application layer: builds roles from the configuration file and
//! applies live reloads (the engine asks for them through its reload hook).
//!
//! Layering: `app` uses `engine`, `role` and `config`; nothing below imports it.

mod reload;
