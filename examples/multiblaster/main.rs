//! Multiblaster, the tutorial game (being built; see issue 6).

fn main() {
    println!("multiblaster: not built yet");
}
