//! Prints what cairn's extractor keeps of an HTML file (a debugging aid):
//! `cargo run --example extract_file -- page.html [URL]`
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let html = std::fs::read_to_string(&args[1]).expect("readable HTML file");
    let url = url::Url::parse(
        args.get(2)
            .map(String::as_str)
            .unwrap_or("http://localhost/"),
    )
    .expect("URL");
    let e = cairn::extract::extract(&html, &url, None);
    println!(
        "title: {:?}\nauthor: {:?}\npublished: {:?}\ncanonical: {:?}\nlinks: {}\n---\n{}",
        e.title,
        e.author,
        e.published,
        e.canonical,
        e.links.len(),
        e.text
    );
}
