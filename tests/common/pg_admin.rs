//! Administering the test cluster from tests: creating databases and
//! running a query as the cluster's owner role. Shared by the
//! integration tests (`tests/common/pg.rs`) and the library's own tests
//! (`src/store/test_databases.rs`, which includes this file by path).

/// Run `query` on the database at `url`, each row's first column as
/// text. On a thread of its own: the caller may be inside a runtime.
pub fn query_first_column(url: &str, password: Option<String>, query: String) -> Vec<String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut config: tokio_postgres::Config = url.parse().unwrap();
            if let Some(p) = password {
                config.password(p);
            }
            let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .simple_query(&query)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).unwrap_or_default().to_owned())
                    }
                    _ => None,
                })
                .collect()
        })
    })
    .join()
    .expect("a query on the test cluster")
}

/// Create a new, empty database on the cluster at `url`; its URL.
pub fn new_database_on(url: &str, password: Option<String>) -> String {
    let name = format!("rd_{:016x}", rand::random::<u64>());
    query_first_column(
        url,
        password,
        format!("CREATE DATABASE {name} ENCODING 'UTF8'"),
    );
    let (base, _) = url.rsplit_once('/').expect("a URL with a database name");
    format!("{base}/{name}")
}
