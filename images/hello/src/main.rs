//! Prints one known line and exits 0; tests look for exactly this line.

fn main() {
    println!("Hello from preseed!");
}
