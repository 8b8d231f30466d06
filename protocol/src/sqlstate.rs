//! SQLSTATE codes that pgheal sends or looks for. Names follow PostgreSQL's
//! `errcodes.txt` (lower-cased condition names, upper-cased here).

/// A five-character SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const fn code(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

macro_rules! sqlstates {
    ($($(#[$doc:meta])* $name:ident = $code:literal;)*) => {
        $($(#[$doc])* pub const $name: SqlState = SqlState($code);)*
    };
}

sqlstates! {
    /// 08000
    CONNECTION_EXCEPTION = "08000";
    /// 08001: the proxy could not reach a server.
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001";
    /// 08006: the server connection broke.
    CONNECTION_FAILURE = "08006";
    /// 08P01: the peer sent bytes that break the protocol.
    PROTOCOL_VIOLATION = "08P01";
    /// 0A000
    FEATURE_NOT_SUPPORTED = "0A000";
    /// 22023
    INVALID_PARAMETER_VALUE = "22023";
    /// 25006
    READ_ONLY_SQL_TRANSACTION = "25006";
    /// 25P02
    IN_FAILED_SQL_TRANSACTION = "25P02";
    /// 26000: no prepared statement by that name.
    INVALID_SQL_STATEMENT_NAME = "26000";
    /// 28000
    INVALID_AUTHORIZATION_SPECIFICATION = "28000";
    /// 28P01
    INVALID_PASSWORD = "28P01";
    /// 3D000
    INVALID_CATALOG_NAME = "3D000";
    /// 42601
    SYNTAX_ERROR = "42601";
    /// 42P05: a prepared statement by that name exists.
    DUPLICATE_PREPARED_STATEMENT = "42P05";
    /// 53300
    TOO_MANY_CONNECTIONS = "53300";
    /// 57014
    QUERY_CANCELED = "57014";
    /// 57P01
    ADMIN_SHUTDOWN = "57P01";
    /// 57P02: the server ends sessions after another backend crashed.
    CRASH_SHUTDOWN = "57P02";
    /// 57P03
    CANNOT_CONNECT_NOW = "57P03";
    /// F0000: the configuration file is wrong.
    CONFIG_FILE_ERROR = "F0000";
    /// 58000
    SYSTEM_ERROR = "58000";
    /// XX000
    INTERNAL_ERROR = "XX000";
}
